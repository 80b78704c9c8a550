"""What a run reports: progress bars, metrics.jsonl (and TensorBoard), the training loss, and the training-curves
plot."""

import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .files import write_atomically

logger = logging.getLogger("dinoseg")


def progress(total: int | None = None, *, desc: str, initial: int = 0, leave: bool = True, iterable=None,
             disable: bool = False) -> tqdm:
    """A progress bar on rank 0 only; redrawn at most every few seconds when stderr is a log file, not a terminal."""
    return tqdm(iterable, total=total, initial=initial, desc=desc, leave=leave, dynamic_ncols=True,
                disable=disable or not distributed.is_main_process(), mininterval=0.1 if sys.stderr.isatty() else 10.0)


class MetricsLog:
    """metrics.jsonl (and optionally TensorBoard), written by rank 0 only."""

    def __init__(self, out: Path, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, iteration: int, **values) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": iteration, **values}, default=float) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, iteration)
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        if isinstance(vv, (int, float)):
                            self.tb.add_scalar(f"{k}/{kk}", vv, iteration)

    def truncate_after(self, iteration: int) -> None:
        """On resume, drop lines logged after the checkpoint (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["iteration"] <= iteration]
        text = "".join(ln + "\n" for ln in lines)
        if text != self.path.read_text():
            write_atomically(self.path, lambda f: f.write(text.encode()))


class LossLog:
    """The training loss, step by step: its mean over processes (a non-finite one stops the run), the progress bar,
    and a metrics.jsonl line every `interval` steps and at the last one, with the mean loss since the previous line
    (single-batch losses are too noisy to read a curve from). `checkpoints` (a `Checkpoints`) names what a stopped
    run keeps.

    SIGTERM (what SLURM, Kubernetes and torchrun send before they kill) may reach some processes only: the loss's
    all-reduce carries whether any got it, so that `preempted` turns true at the same step on every process, which
    then all stop there together, with a checkpoint. The handler is this object's, until `close`."""

    def __init__(self, log: MetricsLog, checkpoints, *, total: int, start: int, interval: int):
        self.log, self.checkpoints, self.total, self.interval = log, checkpoints, total, interval
        self.bar = progress(total, desc="train", initial=start)
        self.t0 = time.perf_counter()
        self.window: list[float] = []  # losses since the last line
        self.preempted = False  # some process got SIGTERM (the same on every process, from `reduce`)
        self._sigterm = False  # this process got it
        self._handling = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
        if self._handling:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm = True

    def reduce(self, loss: torch.Tensor, iteration: int) -> float:
        """The mean of `loss` over processes (every process calls it, before the optimizer step)."""
        local = torch.stack([loss.detach().float().reshape(()), torch.tensor(float(self._sigterm), device=loss.device)])
        total, sigterms = distributed.all_reduce_sum(local).tolist()
        value = total / distributed.get_world_size()
        if sigterms and not self.preempted:
            self.preempted = True
            if distributed.is_main_process():
                logger.info("SIGTERM: stopping after iteration %d, with a checkpoint", iteration + 1)
        if not math.isfinite(value):
            raise self.checkpoints.stopped(f"loss is {value} at iteration {iteration}")
        return value

    def update(self, done: int, loss: float, lr: float) -> None:
        """Step `done` (counted from 1) had `loss` (from `reduce`) at learning rate `lr`."""
        self.window.append(loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if done % self.interval == 0 or done == self.total:
            self.log.write(done, loss=sum(self.window) / len(self.window), lr=lr, seconds=time.perf_counter() - self.t0)
            self.window.clear()

    def close(self) -> None:
        self.bar.close()
        if self._handling:  # None: a handler installed outside Python, i.e. the default one
            signal.signal(signal.SIGTERM, self._previous_handler if self._previous_handler is not None else signal.SIG_DFL)
            self._handling = False


def plot_history(run_dir: Path, metrics: dict[str, tuple[float, float] | None]) -> Path:
    """Training loss and the validation `metrics` (name -> y-axis limits or None) over iterations, from
    metrics.jsonl, as `training_curves.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [(r["iteration"], r["loss"]) for r in rows if "loss" in r]
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(5 * (1 + len(metrics)), 4))
    if train:
        axes[0].plot(*zip(*train), marker=".")
    axes[0].set(title="training loss", xlabel="iteration", ylabel="loss")
    for ax, (name, ylim) in zip(axes[1:], metrics.items()):
        val = [(r["iteration"], r["val"][name]) for r in rows if "val" in r and name in r["val"]]
        if val:
            ax.plot(*zip(*val), marker="o", color="tab:green")
        ax.set(title=f"validation {name}", xlabel="iteration", ylabel=name)
        if ylim is not None:
            ax.set_ylim(*ylim)
    fig.tight_layout()
    path = run_dir / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
