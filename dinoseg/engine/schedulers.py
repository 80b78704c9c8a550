"""Learning-rate schedules as closed-form factors of the base lr, wrapped in a LambdaLR.

Iteration k (0-based) trains with `lr * lr_factor(k)`: the scheduler is stepped after every optimizer step,
the first one included, so warmup starts at step 0 (the official loop skipped the first step).

The official `WarmupOneCycleLR` can also cycle AdamW's beta1 (`use_beta1`): 0 during warmup (the official code
leaves its momentum at 0 there), then cosine from `base_momentum` up to `max_momentum`. Iteration k then trains
with `beta1_at(k)`, again in closed form, so a resumed run gets the same values.
"""

import math
from collections.abc import Callable
from enum import Enum
from functools import partial

import torch


class SchedulerType(Enum):
    WarmupOneCycleLR = "WarmupOneCycleLR"  # the official linear-probe schedule (pct_start=0, cosine annealing)
    POLY = "poly"  # Mask2Former's schedule
    CONSTANT = "constant"


def _one_cycle(step: int, total: int, warmup_iters: int, warmup_ratio: float, final_div_factor: float,
               div_factor: float) -> float:
    """The official `WarmupOneCycleLR` with pct_start=0 and cosine annealing, as a factor of max_lr."""
    min_factor = 1.0 / div_factor / final_div_factor
    if step < warmup_iters:
        if warmup_ratio:
            k = (1 - step / warmup_iters) * (1 - warmup_ratio)
            return (1 - k) * (1 - step / total)
        peak = (1 + math.cos(math.pi * step / total)) / 2
        return 1.0 / final_div_factor + peak * step / warmup_iters
    pct = min((step + 1) / total, 1.0)
    return min_factor + (1 - min_factor) / 2 * (1 + math.cos(math.pi * pct))


def beta1_at(step: int, total_iter: int, warmup_iters: int, base_momentum: float, max_momentum: float) -> float:
    """AdamW's beta1 at iteration `step` under the official `WarmupOneCycleLR` with `use_beta1=True`."""
    if step < warmup_iters:
        return 0.0
    pct = min((step - warmup_iters) / (total_iter - warmup_iters), 1.0)
    return max_momentum + (base_momentum - max_momentum) / 2 * (1 + math.cos(math.pi * pct))


class LambdaLRWithBeta1(torch.optim.lr_scheduler.LambdaLR):
    """A LambdaLR that also sets every parameter group's beta1 to `beta1_at(iteration)` (the optimizer's state
    dict carries the betas; this scheduler's carries only numbers, so checkpoints stay weights-only)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float], *, total_iter: int,
                 warmup_iters: int, base_momentum: float, max_momentum: float):
        self.momentum_schedule = (total_iter, warmup_iters, base_momentum, max_momentum)
        super().__init__(optimizer, lr_lambda)  # steps once: iteration 0 gets its lr and beta1

    def step(self, epoch=None) -> None:
        super().step(epoch)
        beta1 = beta1_at(self.last_epoch, *self.momentum_schedule)
        for group in self.optimizer.param_groups:
            group["betas"] = (beta1, *group["betas"][1:])

    def state_dict(self) -> dict:
        # The cycle follows the configuration, as the lr lambda does: a resumed run may extend total_iter.
        state = super().state_dict()
        state.pop("momentum_schedule")
        return state


def _warmup(step: int, warmup_iters: int, warmup_ratio: float) -> float:
    if step >= warmup_iters:
        return 1.0
    alpha = step / warmup_iters
    return warmup_ratio * (1 - alpha) + alpha


def lr_factor(
    step: int,
    scheduler_type: SchedulerType | str,
    total_iter: int,
    *,
    warmup_iters: int = 0,
    warmup_ratio: float = 1e-6,
    final_div_factor: float = float("inf"),
    div_factor: float = 25.0,
    poly_power: float = 0.9,
    min_lr: float = 0.0,
    base_lr: float = 1.0,
) -> float:
    """The factor of `base_lr` that iteration `step` trains with."""
    kind = SchedulerType(scheduler_type)
    if kind == SchedulerType.WarmupOneCycleLR:
        return _one_cycle(step, total_iter, warmup_iters, warmup_ratio, final_div_factor, div_factor)
    if kind == SchedulerType.POLY:
        decay = max(1 - step / total_iter, 0.0) ** poly_power
        floor = min_lr / base_lr if base_lr else 0.0
        return max(_warmup(step, warmup_iters, warmup_ratio) * decay, floor)
    return _warmup(step, warmup_iters, warmup_ratio)


def build_scheduler(
    scheduler_type: SchedulerType | str,
    optimizer: torch.optim.Optimizer,
    lr: float,
    total_iter: int,
    constructor_kwargs: dict | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `scheduler_type` over `total_iter` iterations peaking at `lr` (the official call form);
    `constructor_kwargs`: `warmup_iters`, `warmup_ratio`, `final_div_factor`, `div_factor`, `poly_power`,
    `min_lr`, and the beta1 cycle of WarmupOneCycleLR: `use_beta1` (default False here, True in the official
    class; other schedules leave beta1 alone), `base_momentum` (0.85), `max_momentum` (0.95). An unknown keyword
    is an error (the official code drops it silently)."""
    kwargs = dict(constructor_kwargs or {})
    momentum = {k: kwargs.pop(k) for k in ("use_beta1", "base_momentum", "max_momentum") if k in kwargs}
    use_beta1 = bool(momentum.pop("use_beta1", False))
    factor: Callable[[int], float] = partial(lr_factor, scheduler_type=SchedulerType(scheduler_type), total_iter=total_iter,
                                             base_lr=lr, **kwargs)
    try:
        factor(0)
    except TypeError as e:
        raise ValueError(f"build_scheduler: {e}") from None
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = lr
    if use_beta1 and SchedulerType(scheduler_type) == SchedulerType.WarmupOneCycleLR:
        return LambdaLRWithBeta1(optimizer, factor, total_iter=total_iter, warmup_iters=kwargs.get("warmup_iters", 0),
                                 base_momentum=momentum.get("base_momentum", 0.85),
                                 max_momentum=momentum.get("max_momentum", 0.95))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
