"""Depth under torchrun: 2-process training (batch split, cross-process batch norm, RNG state per rank) and a sharded
evaluation equal to the one-process one."""

import json

import pytest
import torch

from dinoseg.engine.checkpoint import LAST

from ._depth_run import tiny_depth
from .engine_utils import run_cli
from .test_distributed import _torchrun


@pytest.mark.slow
def test_two_process_training_and_evaluation_equal_one_process(tmp_path):
    out = tmp_path / "ddp"
    # 7 validation images: the shards are uneven, and no image may be counted twice.
    val = "datasets.val=SyntheticDepth:split=VAL:num_samples=7:image_size=64"
    trained = _torchrun(["train", *tiny_depth(out, total_iter=6, checkpoint_interval=3, extra=[val])])
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = torch.load(out / LAST, map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 6 and len(ckpt["rng"]) == 2  # RNG state of every rank
    assert "decoder.batchnorm_layer.running_mean" in ckpt["model"]  # the synchronised batch norm keeps its keys

    config, head = str(out / "depth_config.yaml"), f"head={out / LAST}"
    one = run_cli(["eval", config, head, f"output_dir={tmp_path / 'eval1'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(["eval", config, head, f"output_dir={tmp_path / 'eval2'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "eval1" / "eval" / "checkpoint_last" / "results-depth.json").read_text())
    r2 = json.loads((tmp_path / "eval2" / "eval" / "checkpoint_last" / "results-depth.json").read_text())
    assert r1 == r2 and r1["num_samples"] == 7 and r1["per_image"]["index"] == list(range(7))
    # The 2-process training's final evaluation used the same sharded code path.
    assert json.loads((out / "results-depth.json").read_text()) == r1
