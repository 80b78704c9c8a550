"""Learning-rate schedules as closed-form factors of the base lr, wrapped in a LambdaLR.

Iteration k (0-based) trains with `lr * lr_factor(k)`: the scheduler is stepped after every optimizer step,
the first one included, so warmup starts at step 0 (the official loop skipped the first step).
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
    `min_lr`. An unknown keyword is an error (the official code drops it silently)."""
    kwargs = dict(constructor_kwargs or {})
    factor: Callable[[int], float] = partial(lr_factor, scheduler_type=SchedulerType(scheduler_type), total_iter=total_iter,
                                             base_lr=lr, **kwargs)
    try:
        factor(0)
    except TypeError as e:
        raise ValueError(f"build_scheduler: {e}") from None
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
