"""The official module path of the learning-rate schedules (`dinov3.eval.segmentation.schedulers`); they live in
the engine, shared by every task."""

from ...engine.schedulers import (
    ONE_CYCLE_DEFAULTS,
    AnnealStrategy,
    SchedulerType,
    build_scheduler,
    lr_factor,
    one_cycle_momentum,
)

__all__ = ["ONE_CYCLE_DEFAULTS", "AnnealStrategy", "SchedulerType", "build_scheduler", "lr_factor", "one_cycle_momentum"]
