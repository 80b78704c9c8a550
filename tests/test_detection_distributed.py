"""Detection under torchrun: 2-process training (batch split, DDP over the head with its shared box and class heads)
and a sharded evaluation (each process detects its images, rank 0 gathers them) equal to the one-process one."""

import json

import pytest
import torch

from dinoseg.engine.checkpoint import LAST

from ._detection_run import tiny_detection, write_coco_folders
from .engine_utils import run_cli
from .test_distributed import _torchrun


@pytest.mark.slow
def test_two_process_training_and_evaluation_equal_one_process(tmp_path):
    data = write_coco_folders(tmp_path / "coco", train=8, val=7)  # 7 images: uneven shards, none counted twice
    out = tmp_path / "ddp"
    trained = _torchrun(["train", *tiny_detection(data, out, total_iter=4, checkpoint_interval=2)])
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = torch.load(out / LAST, map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 4 and len(ckpt["rng"]) == 2  # RNG state of every rank
    assert not any(k.startswith("module.") for k in ckpt["model"])

    config, head = str(out / "detection_config.yaml"), f"head={out / LAST}"
    one = run_cli(["eval", config, head, f"output_dir={tmp_path / 'eval1'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(["eval", config, head, f"output_dir={tmp_path / 'eval2'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = (tmp_path / f"eval{n}" / "eval" / "checkpoint_last" for n in (1, 2))
    assert json.loads((r1 / "results-detection.json").read_text()) == json.loads((r2 / "results-detection.json").read_text())
    d1, d2 = (json.loads((r / "detections.json").read_text()) for r in (r1, r2))
    assert d1 == d2 and sorted({d["image_id"] for d in d1}) == list(range(1, 8))
    assert json.loads((r1 / "results-detection.json").read_text())["num_images"] == 7
    # The 2-process training's final validation went through the same sharded path.
    assert json.loads((out / "detections.json").read_text()) == d1
