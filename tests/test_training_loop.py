"""The engine's loop helpers that every task's train.py uses: the loss log (mean over a logging window, a
non-finite loss stops the run naming what is kept, SIGTERM turns into a stop agreed at a step), the best / last
checkpoints and the Ctrl-C and SIGTERM messages, and the check that the global batch splits over the processes."""

import json
import os
import signal

import pytest
import torch
from torch import nn

from dinoseg.engine.checkpoint import BEST, LAST, Checkpoints, Resumed
from dinoseg.engine.config import Precision
from dinoseg.engine.optim import OptimizerStep, TrainingError, TrainingInterrupted, TrainingPreempted
from dinoseg.engine.reporting import LossLog, MetricsLog
from dinoseg.engine.rundir import RunDirectory
from dinoseg.engine.schedulers import build_scheduler
from dinoseg.engine.training import start_processes

from .engine_utils import read_checkpoint


def keeper(out, resumed=None) -> Checkpoints:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    step = OptimizerStep(optimizer, build_scheduler("WarmupOneCycleLR", optimizer, 0.1, 10, {}), Precision.FLOAT32,
                         0.0, torch.device("cpu"))
    return Checkpoints(RunDirectory(out, "config.yaml"), model=model, step=step, config_yaml="seed: 0\n",
                       resumed=resumed or Resumed())


def test_the_loss_log_writes_the_mean_of_each_window(tmp_path):
    losses = LossLog(MetricsLog(tmp_path, tensorboard=False, enabled=True), keeper(tmp_path), total=5, start=0,
                     interval=2)
    for done, value in enumerate([1.0, 3.0, 5.0, 7.0, 9.0], start=1):
        assert losses.reduce(torch.tensor(value), done - 1) == value  # one process: the mean is the loss
        losses.update(done, value, lr=0.5)
    losses.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["loss"]) for r in rows] == [(2, 2.0), (4, 6.0), (5, 9.0)]  # the last step closes a window
    assert all(r["lr"] == 0.5 and r["seconds"] >= 0 for r in rows)


def test_a_non_finite_loss_stops_the_run_naming_what_is_kept(tmp_path):
    checkpoints = keeper(tmp_path)
    losses = LossLog(MetricsLog(tmp_path, tensorboard=False, enabled=False), checkpoints, total=5, start=0, interval=1)
    with pytest.raises(TrainingError, match=r"^loss is inf at iteration 3; training stopped \(no checkpoint written: the run is "
                                            r"undone, and the same command starts it again\)$"):
        losses.reduce(torch.tensor(float("inf")), 3)
    checkpoints.save_last(2)
    with pytest.raises(TrainingError, match=rf"loss is nan at iteration 4; training stopped \(last checkpoint kept: "
                                            rf"{tmp_path / LAST}\)"):
        losses.reduce(torch.tensor(float("nan")), 4)
    losses.close()


def test_checkpoints_keep_the_best_scores_and_say_where_to_resume(tmp_path):
    checkpoints = keeper(tmp_path)
    interrupted = checkpoints.interrupted(3, 10)
    assert isinstance(interrupted, TrainingInterrupted)
    assert str(interrupted) == "interrupted at iteration 3 of 10; no checkpoint written: the run is undone, and the " \
                               "same command starts it again"
    checkpoints.save_best(4, {"mIoU": 0.5})
    checkpoints.save_last(5)
    assert read_checkpoint(tmp_path / BEST)["iteration"] == 4
    last = read_checkpoint(tmp_path / LAST)
    assert last["iteration"] == 5 and last["best"] == {"mIoU": 0.5, "iteration": 4}  # the best so far, in both
    assert f"last checkpoint: {tmp_path / LAST} (iteration 5)" in str(checkpoints.interrupted(7, 10))
    preempted = checkpoints.preempted(5, 10)
    assert isinstance(preempted, TrainingPreempted) and preempted.exit_code == 143
    assert str(preempted) == f"stopped by SIGTERM at iteration 5 of 10, checkpoint written: {tmp_path / LAST}; " \
                             f"continue with the same command and train.resume=auto (or true)"

    # A resumed run starts from the checkpoint's best scores and knows its last checkpoint is on disk.
    resumed = keeper(tmp_path, Resumed(last, tmp_path / LAST))
    assert resumed.best == {"mIoU": 0.5, "iteration": 4} and resumed.saved == 5


def test_processes_are_seeded_and_the_global_batch_must_split_over_them(monkeypatch):
    assert start_processes("cpu", batch_size=3, deterministic=False, seed=5) == torch.device("cpu")
    drawn = torch.rand(3)
    torch.manual_seed(5)  # seed + rank 0
    assert torch.equal(drawn, torch.rand(3))
    monkeypatch.setattr("dinoseg.engine.distributed.get_world_size", lambda: 2)
    with pytest.raises(TrainingError, match="train.batch_size=3 does not split over 2 processes"):
        start_processes("cpu", batch_size=3, deterministic=False, seed=0)


def test_sigterm_is_caught_while_the_loss_log_is_open_and_seen_at_the_next_step(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    losses = LossLog(MetricsLog(tmp_path, tensorboard=False, enabled=False), keeper(tmp_path), total=5, start=0,
                     interval=1)
    assert losses.reduce(torch.tensor(1.0), 0) == 1.0 and not losses.preempted
    os.kill(os.getpid(), signal.SIGTERM)  # the process lives on: the handler only notes it
    assert not losses.preempted  # until the next step's all-reduce (where every process learns it)
    assert losses.reduce(torch.tensor(2.0), 1) == 2.0 and losses.preempted
    losses.close()
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back
