"""Shared settings for the engine tests: a tiny ViT on tiny synthetic images, a few iterations."""

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "device=cpu",  # the tests mean the CPU, also on a machine with a GPU (tests/test_cuda.py covers CUDA)
    "model.dino_hub=null",
    "model.random_init=true",  # random backbone weights: asked for, never a silent default
    "model.backbone_kwargs.patch_size=16",
    "model.backbone_kwargs.embed_dim=32",
    "model.backbone_kwargs.depth=4",
    "model.backbone_kwargs.num_heads=2",
    "model.backbone_kwargs.n_storage_tokens=4",
    "model.backbone_kwargs.layerscale_init=1e-5",
    "model.backbone_kwargs.mask_k_bias=true",
    "model.backbone_kwargs.pos_embed_rope_dtype=fp32",
    "datasets.train=Synthetic:split=TRAIN:num_samples=32:image_size=64",
    "datasets.val=Synthetic:split=VAL:num_samples=6:image_size=64",
    "transforms.train.img_size=64",
    "transforms.train.crop_size=64",
    "transforms.train.random_img_size_ratio_range=[0.75,1.25]",
    "transforms.eval.img_size=64",
    "train.batch_size=4",
    "train.num_workers=0",
    "train.log_interval=5",
    "eval.crop_size=48",
    "eval.stride=32",
    "optimizer.lr=0.01",
    "scheduler.warmup_iters=2",
]


def run_args(base, output_dir, total_iter=10, eval_interval=None, checkpoint_interval=5, extra=()):
    """The settings `base` of a tiny run into `output_dir`, with its schedule and extra `key=value`s."""
    return list(base) + [
        f"output_dir={output_dir}",
        f"scheduler.total_iter={total_iter}",
        f"eval.eval_interval={eval_interval or total_iter}",
        f"train.checkpoint_interval={checkpoint_interval}",
        *extra,
    ]


def tiny(output_dir, total_iter=10, eval_interval=None, checkpoint_interval=5, extra=()):
    return run_args(TINY, output_dir, total_iter, eval_interval, checkpoint_interval, extra)


def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "dinoseg.cli", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout, cwd=REPO, **kwargs)


PAUSED_RUN = REPO / "tests" / "_paused_run.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def start_paused(args, folder, step: int, launcher=(sys.executable,)):
    """Start the command line with `args` (under `launcher`: python, or TORCHRUN) in its own process group, paused
    after training step `step` (tests/_paused_run.py) until `go(folder)`; its stderr goes to folder/stderr.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stderr.txt", "w") as err:
        return subprocess.Popen([*launcher, str(PAUSED_RUN), str(folder), str(step), *args], env=cli_env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def wait_paused(proc, folder, processes: int = 1, timeout: float = 300) -> list[int]:
    """Wait until every process of a `start_paused` run is paused (a file the run writes; no guess at its speed);
    returns their pids by rank."""
    deadline = time.time() + timeout  # only against a hang
    paused = [folder / f"paused.{rank}" for rank in range(processes)]
    while not all(p.exists() for p in paused):
        assert proc.poll() is None, f"the run ended before it paused:\n{(folder / 'stderr.txt').read_text()[-3000:]}"
        assert time.time() < deadline, "the run did not pause"
        time.sleep(0.01)
    return [int(p.read_text()) for p in paused]


def go(folder) -> None:
    (folder / "go").touch()


def read_checkpoint(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_head(a: dict, b: dict, total: int) -> None:
    """Two training checkpoints at iteration `total` with the same head, bit for bit, and the same best scores."""
    import torch

    assert a["iteration"] == b["iteration"] == total
    assert set(a["model"]) == set(b["model"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["best"] == b["best"]


def kill_and_resume(make_args, tmp_path, total: int, checkpoint_name: str = "checkpoint_last.pth"):
    """Run `make_args(out)` uninterrupted; run it again, SIGKILL it one step after its first checkpoint (paused there:
    no race with its speed), resume it.

    Returns (uninterrupted checkpoint, resumed checkpoint) for the caller to compare.
    """
    import signal

    reference = run_cli(make_args(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out, paused = tmp_path / "killed", tmp_path / "paused"
    args = make_args(out)
    interval = int(next(a.split("=", 1)[1] for a in reversed(args) if a.startswith("train.checkpoint_interval=")))
    assert interval < total, "no checkpoint before the end to resume from"
    proc = start_paused(args, paused, step=interval + 1)
    wait_paused(proc, paused)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_checkpoint(out / "checkpoint_last.pth")["iteration"] == interval
    resumed = run_cli(make_args(out) + ["train.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return read_checkpoint(tmp_path / "ref" / checkpoint_name), read_checkpoint(out / checkpoint_name)
