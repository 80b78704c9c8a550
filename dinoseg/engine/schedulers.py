"""Learning-rate schedules as closed-form factors of the base lr, wrapped in a LambdaLR.

Iteration k (0-based) trains with `lr * lr_factor(k)`: the scheduler is stepped after every optimizer step,
the first one included, so warmup starts at step 0 (the official loop skipped the first step). The official
one-cycle momentum schedule (Adam's beta1) is `one_cycle_momentum`. Every parameter group keeps its learning rate
relative to the optimizer's (a group built at 0.1 x the optimizer's lr trains at 0.1 x the schedule).
"""

import bisect
import math
from collections.abc import Callable, Sequence
from enum import Enum
from functools import partial

import torch


class SchedulerType(Enum):
    WarmupOneCycleLR = "WarmupOneCycleLR"  # the official linear-probe schedule
    POLY = "poly"  # Mask2Former's schedule
    CONSTANT = "constant"
    STEP = "step"  # DETR / Plain-DETR: constant after the warmup, times `gamma` at each of the `milestones`


class AnnealStrategy(Enum):
    COS = "cos"
    LINEAR = "linear"


def _anneal(start: float, end: float, pct: float, strategy: str) -> float:
    if strategy == "cos":
        return end + (start - end) / 2 * (1 + math.cos(math.pi * pct))
    return start + (end - start) * pct


def _one_cycle(step: int, total: int, warmup_iters: int, warmup_ratio: float, final_div_factor: float,
               div_factor: float, anneal_strategy: str = "cos") -> float:
    """The official `WarmupOneCycleLR` learning rate as a factor of max_lr (its `pct_start` has no effect)."""
    min_factor = 1.0 / div_factor / final_div_factor
    if step < warmup_iters:
        if warmup_ratio:
            k = (1 - step / warmup_iters) * (1 - warmup_ratio)
            return (1 - k) * (1 - step / total)
        peak = (1 + math.cos(math.pi * step / total)) / 2
        return 1.0 / final_div_factor + peak * step / warmup_iters
    pct = min((step + 1 if anneal_strategy == "cos" else step) / total, 1.0)
    return _anneal(1.0, min_factor, pct, anneal_strategy)


def one_cycle_momentum(step: int, total_iter: int, *, warmup_iters: int = 0, base_momentum: float = 0.85,
                       max_momentum: float = 0.95, anneal_strategy: str = "cos") -> float:
    """The official `WarmupOneCycleLR` momentum (Adam's beta1 with `use_beta1`) of iteration `step`: 0 during the
    warmup, then annealed from `base_momentum` up to `max_momentum`."""
    if step < warmup_iters:
        return 0.0
    return _anneal(base_momentum, max_momentum, (step - warmup_iters) / (total_iter - warmup_iters), anneal_strategy)


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
    anneal_strategy: str = "cos",
    poly_power: float = 0.9,
    min_lr: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    base_lr: float = 1.0,
) -> float:
    """The factor of `base_lr` that iteration `step` trains with. "step": the warmup, then `gamma` ** (the number
    of `milestones` <= `step`): iteration m of a milestone m is the first at the decayed rate."""
    kind = SchedulerType(scheduler_type)
    if kind == SchedulerType.STEP:
        return _warmup(step, warmup_iters, warmup_ratio) * gamma ** bisect.bisect_right(sorted(milestones), step)
    if kind == SchedulerType.WarmupOneCycleLR:
        return _one_cycle(step, total_iter, warmup_iters, warmup_ratio, final_div_factor, div_factor, anneal_strategy)
    if kind == SchedulerType.POLY:
        decay = max(1 - step / total_iter, 0.0) ** poly_power
        floor = min_lr / base_lr if base_lr else 0.0
        return max(_warmup(step, warmup_iters, warmup_ratio) * decay, floor)
    return _warmup(step, warmup_iters, warmup_ratio)


class MomentumLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """A `LambdaLR` that also sets every group's momentum for the step: Adam's beta1 (`key="betas"`) or SGD's
    `momentum` (groups without one are left alone, as the optimizer would ignore it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float],
                 momentum: Callable[[int], float], key: str):
        self._momentum, self._key = momentum, key
        super().__init__(optimizer, lr_lambda)

    def get_lr(self):
        value = self._momentum(self.last_epoch)
        for group in self.optimizer.param_groups:
            if self._key == "betas":
                group["betas"] = (value, *group["betas"][1:])
            elif "momentum" in group:
                group["momentum"] = value
        return super().get_lr()

    def state_dict(self) -> dict:
        # The momentum function is rebuilt from the config, like the lr lambda; checkpoints hold plain values.
        return {k: v for k, v in super().state_dict().items() if k not in ("_momentum", "_key")}


# Official `WarmupOneCycleLR` constructor defaults (a key the official config leaves out means this value).
ONE_CYCLE_DEFAULTS = {"warmup_iters": 0, "warmup_ratio": 0.0, "pct_start": 0.295, "anneal_strategy": "cos",
                      "base_momentum": 0.85, "max_momentum": 0.95, "div_factor": 25.0, "final_div_factor": 1000.0,
                      "use_beta1": True, "update_momentum": True}  # fmt: skip
_MOMENTUM_KEYS = ("base_momentum", "max_momentum", "use_beta1", "update_momentum")


def build_scheduler(
    scheduler_type: SchedulerType | str,
    optimizer: torch.optim.Optimizer,
    lr: float,
    total_iter: int,
    constructor_kwargs: dict | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `scheduler_type` over `total_iter` iterations peaking at `lr` (the official call form).

    "WarmupOneCycleLR" takes the official constructor keywords with the official defaults (`ONE_CYCLE_DEFAULTS`):
    `warmup_iters`, `warmup_ratio`, `anneal_strategy` ("cos" / "linear"), `div_factor`, `final_div_factor`,
    `use_beta1` / `update_momentum` with `base_momentum` / `max_momentum` (the momentum schedule
    `one_cycle_momentum`), `pct_start` (no effect, as officially). "poly", "constant" and "step" take
    `warmup_iters`, `warmup_ratio`, `poly_power`, `min_lr` ("poly"), `milestones` and `gamma` ("step"). An unknown
    keyword is an error (the official code drops it silently).

    Each parameter group's learning rate is `lr` times its `lr_scale`: its ratio to the optimizer's own lr
    (`defaults["lr"]`) when it has none. Groups built at one lr all get `lr`, as officially; a group built at a
    tenth of it stays at a tenth.
    """
    try:
        kind = SchedulerType(scheduler_type)
    except ValueError:
        raise ValueError(f"build_scheduler: unknown scheduler_type {scheduler_type!r}; expected one of "
                         f"{[t.value for t in SchedulerType]}") from None
    kwargs = dict(constructor_kwargs or {})
    momentum = None
    if kind == SchedulerType.WarmupOneCycleLR:
        kwargs = {**ONE_CYCLE_DEFAULTS, **kwargs}
        kwargs.pop("pct_start")
        try:
            kwargs["anneal_strategy"] = AnnealStrategy(getattr(kwargs["anneal_strategy"], "value",
                                                               kwargs["anneal_strategy"])).value
        except ValueError:
            raise ValueError(f"build_scheduler: anneal_strategy must be 'cos' or 'linear', got "
                             f"{kwargs['anneal_strategy']!r}") from None
        use_beta1, update_momentum = kwargs.pop("use_beta1"), kwargs.pop("update_momentum")
        base, top = kwargs.pop("base_momentum"), kwargs.pop("max_momentum")
        # Without beta1, the official schedule writes a `momentum` that Adam-type optimizers never read.
        if use_beta1 or (update_momentum and any("momentum" in g for g in optimizer.param_groups)):
            momentum = (partial(one_cycle_momentum, total_iter=total_iter, warmup_iters=kwargs["warmup_iters"],
                                base_momentum=base, max_momentum=top, anneal_strategy=kwargs["anneal_strategy"]),
                        "betas" if use_beta1 else "momentum")
    else:
        for key in (*_MOMENTUM_KEYS, "anneal_strategy"):  # one-cycle settings: other schedules leave beta1 alone
            kwargs.pop(key, None)
    factor: Callable[[int], float] = partial(lr_factor, scheduler_type=kind, total_iter=total_iter, base_lr=lr,
                                             **kwargs)
    try:
        factor(0)
    except TypeError as e:
        raise ValueError(f"build_scheduler: {e}") from None
    base = optimizer.defaults.get("lr") or 0.0
    for group in optimizer.param_groups:
        # The group's ratio, kept in the group (and its checkpoints), so the schedule can be rebuilt on it.
        scale = group.setdefault("lr_scale", group["lr"] / base if base > 0 else 1.0)
        group["lr"] = group["initial_lr"] = lr * scale
    if momentum is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return MomentumLambdaLR(optimizer, factor, *momentum)
