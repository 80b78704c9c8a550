"""Optimisation: AdamW over the trainable parameters, mixed precision, and one optimiser step per call."""

import torch
from torch import nn

from .config import Precision


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says why and what was kept."""

    exit_code = 2


class TrainingInterrupted(TrainingError):
    """Ctrl-C during training; the message gives the iteration reached, the last checkpoint and how to resume."""

    exit_code = 130


class TrainingPreempted(TrainingError):
    """SIGTERM during training (a preemption, a time limit): every process finished its step and the run wrote a
    checkpoint there; the same command with train.resume=auto continues exactly. 143 = 128 + SIGTERM, the status a
    shell reports for a process SIGTERM ended: not 0, so no scheduler or launcher takes the run for finished."""

    exit_code = 143


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float, *,
                    param_groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (the frozen backbone has none). `param_groups` splits them into
    groups with their own `lr_scale` (the group trains at `lr_scale` x the scheduled lr) and `weight_decay`
    (default: `weight_decay`); every trainable parameter must be in exactly one group."""
    params = [p for p in model.parameters() if p.requires_grad]
    if param_groups is None:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    grouped = [id(p) for group in param_groups for p in group["params"]]
    if sorted(grouped) != sorted(id(p) for p in params):
        raise ValueError("build_optimizer: param_groups must hold every trainable parameter of the model exactly once")
    groups = [{**group, "params": list(group["params"]), "lr_scale": float(group.get("lr_scale", 1.0)),
               "lr": lr * float(group.get("lr_scale", 1.0))} for group in param_groups if group["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


class OptimizerStep:
    """backward -> (unscale) -> clip -> step -> schedule, with a gradient scaler for float16.

    `step(loss)` returns the learning rate the step used.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler, precision: Precision, gradient_clip: float,
                 device: torch.device):
        if precision == Precision.FLOAT16 and device.type != "cuda":
            raise TrainingError("precision=float16 needs CUDA (gradient scaling); use bfloat16 on CPU")
        self.optimizer, self.scheduler, self.gradient_clip = optimizer, scheduler, gradient_clip
        self.scaler = torch.amp.GradScaler("cuda") if precision == Precision.FLOAT16 else None
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def step(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.gradient_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.gradient_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return lr

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
