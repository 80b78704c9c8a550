"""Learning-rate schedules as closed-form factors of the base lr, wrapped in a LambdaLR.

Iteration k (0-based) trains with `lr * lr_factor(k)`: the scheduler is stepped after every optimizer step,
the first one included, so warmup starts at step 0 (the official loop skipped the first step).
"""

import math

import torch

from .config import SchedulerConfig, SchedulerType


def _one_cycle(step: int, cfg: SchedulerConfig) -> float:
    """The official `WarmupOneCycleLR` with pct_start=0 and cosine annealing, as a factor of max_lr."""
    total, warm = cfg.total_iter, cfg.warmup_iters
    min_factor = 1.0 / cfg.div_factor / cfg.final_div_factor
    if step < warm:
        if cfg.warmup_ratio:
            k = (1 - step / warm) * (1 - cfg.warmup_ratio)
            return (1 - k) * (1 - step / total)
        peak = (1 + math.cos(math.pi * step / total)) / 2
        return 1.0 / cfg.final_div_factor + peak * step / warm
    pct = min((step + 1) / total, 1.0)
    return min_factor + (1 - min_factor) / 2 * (1 + math.cos(math.pi * pct))


def _warmup(step: int, cfg: SchedulerConfig) -> float:
    if step >= cfg.warmup_iters:
        return 1.0
    alpha = step / cfg.warmup_iters
    return cfg.warmup_ratio * (1 - alpha) + alpha


def lr_factor(step: int, cfg: SchedulerConfig, base_lr: float = 1.0) -> float:
    kind = SchedulerType(cfg.type) if not isinstance(cfg.type, SchedulerType) else cfg.type
    if kind == SchedulerType.WarmupOneCycleLR:
        return _one_cycle(step, cfg)
    if kind == SchedulerType.POLY:
        decay = max(1 - step / cfg.total_iter, 0.0) ** cfg.poly_power
        floor = cfg.min_lr / base_lr if base_lr else 0.0
        return max(_warmup(step, cfg) * decay, floor)
    return _warmup(step, cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, base_lr))
