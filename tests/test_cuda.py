"""CUDA: the deterministic mode makes kill-and-resume exact there too, and torchrun with more processes than GPUs
ends in one line. The CUDA tests run only where a GPU is (the other tests pin `device=cpu`)."""

import json
import subprocess
import sys

import pytest
import torch

from ._depth_run import tiny_depth
from .engine_utils import REPO, assert_same_head, cli_env, kill_and_resume, run_cli, tiny
from .test_m2f_train import ADAPTER, _train_args

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ON_CUDA = ["device=cuda", "train.deterministic=true"]


def test_deterministic_mode_sets_torch_up():
    code = ("import json, os, torch; from dinoseg.engine.training import make_deterministic; make_deterministic(); "
            "print(json.dumps([torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, "
            "torch.backends.cudnn.benchmark, os.environ['CUBLAS_WORKSPACE_CONFIG']]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == [True, True, False, ":4096:8"]


@cuda
def test_kill_and_resume_is_exact_on_cuda_for_the_linear_head(tmp_path):
    total = 40

    def args(out):
        return ["train", *tiny(out, total_iter=total, eval_interval=20, checkpoint_interval=10), *ON_CUDA]

    assert_same_head(*kill_and_resume(args, tmp_path, total), total)


@cuda
def test_kill_and_resume_is_exact_on_cuda_for_mask2former(tmp_path):
    total = 16

    def args(out):
        return _train_args(out, total_iter=total, eval_interval=8, checkpoint_interval=4,
                           extra=["eval.max_val_samples=2", *ON_CUDA])

    a, b = kill_and_resume(args, tmp_path, total)
    assert any(k.startswith(ADAPTER) for k in a["model"])
    assert_same_head(a, b, total)


@cuda
def test_kill_and_resume_is_exact_on_cuda_for_depth(tmp_path):
    total = 40

    def args(out):
        return ["train", *tiny_depth(out, total_iter=total, eval_interval=20, checkpoint_interval=10), *ON_CUDA]

    assert_same_head(*kill_and_resume(args, tmp_path, total), total)


@cuda
@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="needs a machine with one GPU")
def test_more_processes_than_gpus_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dinoseg.cli",
           "train", *tiny(tmp_path / "r", total_iter=4), "device=cuda"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    assert run.returncode != 0
    assert "dinoseg: error: 2 processes on this machine but 1 GPU(s) visible" in run.stderr
    assert "dinoseg/engine" not in run.stderr  # no traceback through dinoseg (torchrun reports the failed children)


@cuda
def test_float16_training_with_the_gradient_scaler(tmp_path):
    run = run_cli(["train", *tiny(tmp_path / "fp16", total_iter=6, checkpoint_interval=6), "device=cuda",
                   "precision=float16"])
    assert run.returncode == 0, run.stderr[-3000:]
