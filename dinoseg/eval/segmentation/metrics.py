"""Semantic segmentation metrics: per-class areas, a dataset-level accumulator, and the official reductions.

Areas are integer pixel counts kept in int64, so sums over large datasets stay exact, and reduced across
processes with one `all_reduce(SUM)` (each process contributes only the samples it saw).
"""

import math
from collections.abc import Sequence

import torch

from ...data.datasets.base import reduce_zero_label
from ...engine import distributed

__all__ = [
    "METRIC_GROUPS",
    "SEGMENTATION_METRICS",
    "SUMMARY_NAMES",
    "SegmentationMetrics",
    "calculate_intersect_and_union",
    "calculate_segmentation_metrics",
    "format_per_class_table",
    "preprocess_nonzero_labels",
    "total_area_to_metrics",
]

# Keys of `calculate_segmentation_metrics`, as in the official code.
SEGMENTATION_METRICS = ["mIoU", "acc", "aAcc", "dice", "fscore", "precision", "recall"]
# Official key -> key of `SegmentationMetrics.compute` (same quantities).
SUMMARY_NAMES = {"mIoU": "mIoU", "acc": "mAcc", "aAcc": "aAcc", "dice": "mDice", "fscore": "mFscore",
                 "precision": "mPrecision", "recall": "mRecall"}  # fmt: skip


def preprocess_nonzero_labels(label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """`reduce_zero_label` (the official name): label 0 becomes `ignore_index`, every other label `l` becomes `l - 1`."""
    return reduce_zero_label(label, ignore_index)


def calculate_intersect_and_union(
    pred_label: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    reduce_zero_label: bool = False,
    *,
    strict: bool = True,
) -> torch.Tensor:
    """Per-class pixel areas, int64 [4, num_classes]: intersect, union, predicted, label.

    `pred_label` and `label` are class maps of the same shape; pixels whose (reduced) label is `ignore_index`
    are skipped. Label or predicted values outside [0, num_classes) that are not `ignore_index` are an error;
    `strict=False` reproduces the official histogram instead, which silently leaves such values out of the
    histogram they fall in (a stray label still counts in the predicted area of its pixel). The official result
    is float32; this one is exact int64.
    """
    if pred_label.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred_label.shape)} != label shape {tuple(label.shape)}")
    if pred_label.is_floating_point() or label.is_floating_point():
        raise TypeError(f"class maps must be integer tensors, got {pred_label.dtype} and {label.dtype}")
    pred_label = pred_label.to(label.device).long()
    label = preprocess_nonzero_labels(label, ignore_index) if reduce_zero_label else label.long()
    mask = label != ignore_index
    pred_label, label = pred_label[mask], label[mask]
    in_range = []
    for name, values in (("label", label), ("prediction", pred_label)):
        ok = (values >= 0) & (values < num_classes)
        if strict and not ok.all():
            raise ValueError(
                f"{name} value {values[~ok][0].item()} is outside [0, {num_classes}) and is not "
                f"ignore_index {ignore_index}" + (" (after reduce_zero_label)" if reduce_zero_label else "")
            )
        in_range.append(values if strict else values[ok])
    label_in, pred_in = in_range
    area_intersect = torch.bincount(label[(pred_label == label) & (label >= 0) & (label < num_classes)],
                                    minlength=num_classes)  # fmt: skip
    area_pred = torch.bincount(pred_in, minlength=num_classes)
    area_label = torch.bincount(label_in, minlength=num_classes)
    return torch.stack([area_intersect, area_pred + area_label - area_intersect, area_pred, area_label])


# The official `metrics` choices and the per-class results each one adds.
METRIC_GROUPS = {"mIoU": ("mIoU", "acc"), "dice": ("dice", "acc"), "fscore": ("fscore", "precision", "recall")}


def _per_class_metrics(areas: torch.Tensor, beta: float = 1.0) -> dict[str, torch.Tensor]:
    """Every per-class metric (float64, NaN where undefined) from summed areas [4, C]; "aAcc" is a scalar."""
    intersect, union, pred, label = areas.double()
    precision = intersect / pred
    recall = intersect / label
    return {
        "aAcc": intersect.sum() / label.sum(),
        "mIoU": intersect / union,
        "acc": recall,
        "dice": 2 * intersect / (pred + label),
        "fscore": (1 + beta**2) * precision * recall / (beta**2 * precision + recall),
        "precision": precision,
        "recall": recall,
    }


def _check_metrics(metrics) -> list[str]:
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not set(metrics) <= set(METRIC_GROUPS):
        raise KeyError(f"metrics {metrics} is not supported; choose from {list(METRIC_GROUPS)}")
    return metrics


def total_area_to_metrics(
    total_area_intersect: torch.Tensor,
    total_area_union: torch.Tensor,
    total_area_pred_label: torch.Tensor,
    total_area_label: torch.Tensor,
    metrics=("mIoU",),
    beta: float = 1,
) -> dict[str, torch.Tensor]:
    """Per-class metrics of summed areas (official call form): "aAcc" (a scalar) and, per requested metric,
    "mIoU" -> mIoU, acc; "dice" -> dice, acc; "fscore" -> fscore, precision, recall. Float64, NaN where undefined."""
    areas = torch.stack([torch.as_tensor(a) for a in (total_area_intersect, total_area_union, total_area_pred_label,
                                                      total_area_label)])
    every = _per_class_metrics(areas, beta)
    keys = ["aAcc"] + [k for m in _check_metrics(metrics) for k in METRIC_GROUPS[m]]
    return {k: every[k] for k in dict.fromkeys(keys)}


def calculate_segmentation_metrics(pre_eval_results, metrics=("mIoU",), beta: float = 1) -> dict[str, torch.Tensor]:
    """Dataset metrics (official keys `SEGMENTATION_METRICS`, fractions): NaN-mean over classes of the metrics
    of the summed areas. `pre_eval_results`: one [4, C] area stack, or a sequence / [N, 4, C] stack of them.
    `metrics` is checked against the official choices; every key is returned whatever it holds (the official code
    needs all three choices to return at all)."""
    _check_metrics(metrics)
    areas = pre_eval_results
    if not torch.is_tensor(areas):
        areas = torch.stack([torch.as_tensor(a) for a in areas])
    if areas.ndim == 3:
        areas = areas.sum(0)
    if areas.ndim != 2 or areas.shape[0] != 4:
        raise ValueError(f"expected areas [4, C] or [N, 4, C], got shape {tuple(areas.shape)}")
    return {k: v.nanmean() for k, v in _per_class_metrics(areas, beta).items()}


def format_per_class_table(per_class: dict[str, torch.Tensor], class_names: Sequence[str] | None = None, digits: int = 2) -> str:
    """Plain-text table, one row per class, values in percent ("nan" where a class is absent)."""
    columns = [k for k in ("mIoU", "acc", "dice", "fscore", "precision", "recall") if k in per_class]
    titles = {"mIoU": "IoU", "acc": "Acc", "dice": "Dice", "fscore": "Fscore", "precision": "Precision",
              "recall": "Recall"}  # fmt: skip
    n = len(per_class[columns[0]])
    if class_names is not None and len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for {n} classes")
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(n)]
    name_width = max(len("Class"), *(len(s) for s in names))
    widths = [max(len(titles[c]), digits + 5) for c in columns]
    lines = [f"{'Class':<{name_width}}  " + "  ".join(f"{titles[c]:>{w}}" for c, w in zip(columns, widths))]
    for i, name in enumerate(names):
        cells = []
        for c, w in zip(columns, widths):
            value = float(per_class[c][i]) * 100
            cells.append(f"{'nan' if math.isnan(value) else f'{value:.{digits}f}':>{w}}")
        lines.append(f"{name:<{name_width}}  " + "  ".join(cells))
    return "\n".join(lines)


class SegmentationMetrics:
    """Accumulates per-class areas over a dataset; `all_reduce()` sums them over processes, `compute()` reduces.

    `update(pred, label)` takes class maps of the same shape ([H, W] or [B, H, W]) or scores [B, C, H, W] with
    labels [B, H, W] (argmax over C). Summary keys: mIoU, mAcc, aAcc, mDice, mFscore, mPrecision, mRecall
    (fractions; NaN-mean over classes, as the official code). `strict`: see `calculate_intersect_and_union`.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        class_names: Sequence[str] | None = None,
        beta: float = 1.0,
        device: torch.device | str | None = None,
        strict: bool = True,
    ):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.class_names = list(class_names) if class_names is not None else None
        self.beta = beta
        self.strict = strict
        self.device = torch.device(device) if device is not None else None
        self.reset()

    def reset(self) -> None:
        self.areas = torch.zeros(4, self.num_classes, dtype=torch.int64, device=self.device)
        self.num_samples = 0
        self._reduced = False

    @torch.no_grad()
    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        if self._reduced:
            raise RuntimeError("SegmentationMetrics.update() after all_reduce(): call reset() first")
        if pred.is_floating_point():
            if pred.ndim != label.ndim + 1:
                raise ValueError(f"scores {tuple(pred.shape)} need labels with one dim less, got {tuple(label.shape)}")
            pred = pred.argmax(dim=1)
        areas = calculate_intersect_and_union(
            pred,
            label,
            self.num_classes,
            ignore_index=self.ignore_index,
            reduce_zero_label=self.reduce_zero_label,
            strict=self.strict,
        )
        if self.areas.device != areas.device and self.num_samples == 0 and self.device is None:
            self.areas = self.areas.to(areas.device)  # follow the data's device until told otherwise
        self.areas += areas.to(self.areas.device)
        self.num_samples += label.shape[0] if label.ndim == 3 else 1

    def all_reduce(self) -> None:
        """Sum the areas (and sample counts) of all processes, once; a no-op without torch.distributed."""
        if self._reduced:
            raise RuntimeError("SegmentationMetrics.all_reduce() called twice: samples would be counted again")
        if distributed.get_world_size() > 1:
            counts = torch.cat([self.areas.flatten(), self.areas.new_tensor([self.num_samples])])
            counts = distributed.all_reduce_sum(counts)
            self.areas = counts[:-1].view(4, self.num_classes).to(self.areas.device)
            self.num_samples = int(counts[-1])
        self._reduced = True

    def per_class(self) -> dict[str, torch.Tensor]:
        """Per-class metrics (fractions, NaN for classes absent from prediction and label), CPU float64."""
        metrics = _per_class_metrics(self.areas.cpu(), self.beta)
        metrics.pop("aAcc")
        return metrics

    def compute(self) -> dict[str, float]:
        return {SUMMARY_NAMES[k]: float(v) for k, v in calculate_segmentation_metrics(self.areas.cpu(), beta=self.beta).items()}

    def format_table(self, digits: int = 2) -> str:
        return format_per_class_table(self.per_class(), self.class_names, digits)
