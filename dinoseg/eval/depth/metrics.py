"""Depth metrics (official `dinov3.eval.depth.metrics`): threshold accuracies a1..a3, AbsRel, SqRel, RMSE,
RMSE(log), log10, SILog, MAE, computed over the valid pixels of a batch."""

import math
from collections import namedtuple
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .datasets.datasets_utils import make_valid_mask

__all__ = ["DEPTH_METRICS", "DEPTH_METRICS_NAME", "calculate_depth_metrics", "make_valid_mask"]


@dataclass(frozen=True)
class _DepthMetric:
    name: str
    is_lower_better: bool

    @property
    def worst_value(self) -> float:
        return math.inf if self.is_lower_better else -math.inf

    def is_better(self, value1, value2) -> bool:
        sign = 1 if self.is_lower_better else -1
        return sign * value1 < sign * value2


DEPTH_METRICS = (
    _DepthMetric(name="a1", is_lower_better=False),
    _DepthMetric(name="a2", is_lower_better=False),
    _DepthMetric(name="a3", is_lower_better=False),
    _DepthMetric(name="abs_rel", is_lower_better=True),
    _DepthMetric(name="rmse", is_lower_better=True),
    _DepthMetric(name="log_10", is_lower_better=True),
    _DepthMetric(name="rmse_log", is_lower_better=True),
    _DepthMetric(name="silog", is_lower_better=True),
    _DepthMetric(name="sq_rel", is_lower_better=True),
    _DepthMetric(name="mae", is_lower_better=True),
)
DEPTH_METRICS_NAME = [metric.name for metric in DEPTH_METRICS]
_BY_NAME = {metric.name: metric for metric in DEPTH_METRICS}

_DepthMetricValues = namedtuple("DepthMetricValues", DEPTH_METRICS_NAME)


def metrics_from_names(names: Sequence["str | _DepthMetric"]) -> list[_DepthMetric]:
    """`DEPTH_METRICS` entries from names (or entries), in the order given; unknown names are an error."""
    out = []
    for item in names:
        if isinstance(item, _DepthMetric):
            out.append(item)
        elif item in _BY_NAME:
            out.append(_BY_NAME[item])
        else:
            raise ValueError(f"unknown depth metric {item!r}; expected some of {DEPTH_METRICS_NAME}")
    return out


def _compute(name: str, gt: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    if name in ("a1", "a2", "a3"):
        ratio = torch.maximum(gt / pred, pred / gt)
        return (ratio < 1.25 ** int(name[1])).float().mean()
    error = gt - pred
    if name == "abs_rel":
        return (error.abs() / gt).mean()
    if name == "sq_rel":
        return (error**2 / gt).mean()
    if name == "rmse":
        return (error**2).mean().sqrt()
    if name == "mae":
        return error.abs().mean()
    if name == "log_10":
        return (torch.log10(gt) - torch.log10(pred)).abs().mean()
    log_error = torch.log(gt) - torch.log(pred)
    if name == "rmse_log":
        return (log_error**2).mean().sqrt()
    # silog; rounding can make the variance slightly negative when it is ~0
    return ((log_error**2).mean() - log_error.mean() ** 2).clamp_min(0).sqrt() * 100


def calculate_depth_metrics(
    gt: torch.Tensor,
    pred: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    list_metrics: Sequence[_DepthMetric] = DEPTH_METRICS,
    *,
    keep_all_without_mask: bool = False,
):
    """Metrics of `pred` against `gt` over the pixels of `valid_mask` where ``gt > 0``, pooled over the batch.

    Returns a namedtuple with a 0-dim tensor per metric of `DEPTH_METRICS`; the ones not in `list_metrics`
    (entries or names) are NaN, and so are all of them when no pixel is valid. Without a `valid_mask`, the
    pixels with ``gt > 0`` are used (``keep_all_without_mask=True``: all pixels, as the official code).
    """
    wanted = {metric.name for metric in metrics_from_names(list_metrics)}
    if valid_mask is None:
        valid = torch.ones_like(gt, dtype=torch.bool) if keep_all_without_mask else gt > 0
    else:
        valid = valid_mask.bool() & (gt > 0)
    gt, pred = gt[valid], pred[valid]
    nan = torch.full((), math.nan, device=gt.device)
    values = {
        name: _compute(name, gt, pred) if name in wanted and gt.numel() > 0 else nan for name in DEPTH_METRICS_NAME
    }
    return _DepthMetricValues(**values)
