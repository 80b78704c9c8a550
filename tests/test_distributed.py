import json
import os
import signal
import subprocess

import pytest
import torch

from dinoseg.engine.checkpoint import LAST

from .engine_utils import (
    REPO,
    TORCHRUN,
    assert_same_head,
    cli_env,
    go,
    read_checkpoint,
    run_cli,
    start_paused,
    tiny,
    wait_paused,
)


def _torchrun(args, timeout=300):
    return subprocess.run([*TORCHRUN, "-m", "dinoseg.cli", *args], capture_output=True, text=True, env=cli_env(),
                          cwd=REPO, timeout=timeout)


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


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_with_a_checkpoint_and_the_same_command_continues_exactly(tmp_path):
    """Under torchrun a signal may reach some processes only: they agree at the next step's all-reduce, stop at the
    same iteration, rank 0 writes the checkpoint there, and the same command continues to the uninterrupted head."""
    command = lambda out: ["train", *tiny(out, total_iter=8, checkpoint_interval=4, extra=["train.resume=auto"])]  # noqa: E731
    reference = _torchrun(command(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out, paused = tmp_path / "preempted", tmp_path / "paused"
    proc = start_paused(command(out), paused, step=2, launcher=TORCHRUN)
    _, rank1 = wait_paused(proc, paused, processes=2)
    os.kill(rank1, signal.SIGTERM)  # rank 1 only
    go(paused)
    assert proc.wait(timeout=300) != 0  # torchrun reports its processes' failure (143 each)
    err = (paused / "stderr.txt").read_text()
    stopped = [line for line in err.splitlines() if "dinoseg: error: stopped by SIGTERM at iteration 3 of 8" in line]
    assert len(stopped) == 2 and "exitcode  : 143" in err, err[-3000:]  # both processes, at the same step
    checkpoint = read_checkpoint(out / LAST)
    assert checkpoint["iteration"] == 3 and len(checkpoint["rng"]) == 2
    resumed = _torchrun(command(out))  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_head(read_checkpoint(tmp_path / "reference" / LAST), read_checkpoint(out / LAST), 8)


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
