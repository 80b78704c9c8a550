import json
import subprocess
import sys

import pytest
import torch

from dinoseg.engine.checkpoint import LAST

from .engine_utils import REPO, cli_env, run_cli, tiny


def _torchrun(args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dinoseg.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=timeout)


@pytest.mark.slow
def test_two_process_training_and_sharded_evaluation(tmp_path):
    out = tmp_path / "ddp"
    # 7 validation images: the shards are uneven, and no image may be counted twice.
    val = "datasets.val=Synthetic:split=VAL:num_samples=7:image_size=64"
    common = tiny(out, total_iter=6, checkpoint_interval=3, extra=[val])
    trained = _torchrun(["train", *common])
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = torch.load(out / LAST, map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 6 and len(ckpt["rng"]) == 2  # RNG state of every rank
    # SyncBatchNorm keeps the head's state-dict keys unchanged.
    assert "segmentation_model.1.batchnorm_layer.running_mean" in ckpt["model"]

    config = str(out / "segmentation_config.yaml")
    one = run_cli(["eval", config, f"head={out / LAST}", f"output_dir={tmp_path / 'eval1'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(["eval", config, f"head={out / LAST}", f"output_dir={tmp_path / 'eval2'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "eval1" / "eval" / "checkpoint_last" / "results-semantic-segmentation.json").read_text())
    r2 = json.loads((tmp_path / "eval2" / "eval" / "checkpoint_last" / "results-semantic-segmentation.json").read_text())
    assert r1 == r2
    # The 2-process training's own final validation used the same sharded code path.
    r_train = json.loads((out / "results-semantic-segmentation.json").read_text())
    assert r_train["mIoU"] == r1["mIoU"]


def test_ddp_wraps_the_head_only(tmp_path):
    import torch.distributed as dist

    from dinoseg.engine.distributed import CrossProcessBatchNorm2d
    from dinoseg.engine.training import wrap_distributed
    from dinoseg.eval.segmentation.config import load_config
    from dinoseg.eval.segmentation.setup import build_model

    from .engine_utils import TINY

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model(load_config([], TINY), num_classes=4)
        ddp = wrap_distributed(model, torch.device("cpu"))
        backbone = {n for n, _ in model.named_parameters() if ".feature_model." in n}
        backbone |= {n for n, _ in model.named_buffers() if ".feature_model." in n}
        assert backbone and backbone <= set(ddp.parameters_to_ignore)
        synced = {id(p) for p in ddp._module_parameters}
        head = {id(p) for p in model.segmentation_model[1].parameters()}
        assert synced == head  # gradients of the head only are all-reduced
        assert isinstance(model.segmentation_model[1].batchnorm_layer, CrossProcessBatchNorm2d)
    finally:
        dist.destroy_process_group()
