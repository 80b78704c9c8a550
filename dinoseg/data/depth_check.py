"""check-data for depth datasets: walk the dataset once and report, by file, what would break or skew training
and evaluation.

Problems (errors): missing or unreadable / corrupt image or depth map, image/depth size mismatch, empty split,
depth units that look wrong (`depth_units_fault`: the median valid depth, in metres after dividing by the dataset's
`depth_scale`, is implausible or above the dataset's `max_depth`, or an 8-bit map cannot hold a depth of 1 m at
that scale); with ``units_are_problems=False`` these are warnings. Warnings: other 8-bit depth maps (usually a
visualisation, not a measurement), maps without any valid pixel (they score NaN and are left out of the metrics),
and a large share of invalid pixels. The summary gives the depth range and the share of invalid pixels over the
usable samples. Training runs the unit checks on a sample of its maps before the first step (`sampled_units_fault`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .check_common import Problem, indexing_problems, read_pair, report_lines, sample_indices
from .datasets.depth_base import depth_bit_depth

# Plausible median depth of a scene (metres): below, the map is probably in a larger unit than declared
# (e.g. metres read as millimetres); above, in a smaller one.
PLAUSIBLE_MEDIAN_DEPTH = (0.05, 500.0)
HIGH_INVALID_SHARE = 0.9  # a map with more missing pixels than this is flagged
# An 8-bit map (255 levels) whose deepest storable value is below this (metres) at the dataset's scale holds no scene
# depth: a visualisation saved as depth, or a scale meant for 16-bit maps.
MIN_8BIT_RANGE = 1.0
SCALE_HINT = "is the scale right (NYU PNGs: 1000, KITTI PNGs: 256, metres: 1)?"


@dataclass
class DepthCheckReport:
    dataset: str
    num_samples: int
    num_checked: int
    depth_scale: float
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    num_usable: int = 0  # checked samples without problems: the statistics count these
    valid_pixels: int = 0
    invalid_pixels: int = 0
    min_depth: float = float("inf")  # metres, over the valid pixels of the usable samples
    max_depth: float = 0.0
    median_depths: list[float] = field(default_factory=list)  # per usable sample with valid pixels

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def invalid_share(self) -> float:
        total = self.valid_pixels + self.invalid_pixels
        return self.invalid_pixels / total if total else 0.0

    def format(self, max_problems: int = 50) -> str:
        return format_depth_report(self, max_problems)


def depth_units_fault(metres: np.ndarray, scale: float, max_depth: float | None = None,
                      bit_depth: int | None = None) -> str | None:
    """What looks wrong with the units of one depth map (`metres`: its valid values divided by `scale`, the dataset's
    stored units per metre; `bit_depth`: 8 for an 8-bit file), or None."""
    median = float(np.median(metres))
    units = f"with depth_scale={scale:g} stored units per metre"
    if bit_depth == 8 and 255 / scale < MIN_8BIT_RANGE:
        return (f"depth units look wrong: an 8-bit depth map {units} holds no depth beyond {255 / scale:.3g} m (median "
                f"{median:.3g} m; a visualisation saved as depth?)")
    low, high = PLAUSIBLE_MEDIAN_DEPTH
    if median < low:
        return f"depth units look wrong: median valid depth {median:.4g} m {units}"
    if median > high or (max_depth is not None and median > max_depth):
        bound = f" (this dataset's depths stop at {max_depth:g} m)" if max_depth is not None and median <= high else ""
        return f"depth units look wrong: median valid depth {median:.4g} m{bound} {units}"
    return None


def _bit_depth(dataset, index: int) -> int | None:
    path = dataset.depth_path(index)
    return depth_bit_depth(path) if path is not None else None


def sampled_units_fault(dataset, num_samples: int = 8) -> Problem | None:
    """The first of `num_samples` depth maps spread over `dataset` whose units look wrong (`depth_units_fault`), or
    None: the cheap part of check-data, for a training run to make before its first step. Maps that cannot be read
    are left to the training, which names them."""
    scale, max_depth = float(dataset.depth_scale), getattr(dataset, "max_depth", None)
    for i in np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), num_samples)).round().astype(int)).tolist():
        try:
            depth = dataset.load_depth(i).numpy().reshape(-1)
        except Exception:
            continue
        valid = depth[depth > 0]
        if valid.size == 0:
            continue
        fault = depth_units_fault(valid.astype(np.float64) / scale, scale, max_depth, _bit_depth(dataset, i))
        if fault is not None:
            return Problem(dataset.depth_path(i) or dataset.image_path(i) or dataset.sample_name(i), fault)
    return None


def check_depth_dataset(dataset, max_samples: int | None = None, progress: bool = False,
                        units_are_problems: bool = True) -> DepthCheckReport:
    """Read every sample (image and depth, before transforms) and collect problems per file; never stops at the
    first one and never raises on a bad file. `units_are_problems`: depth units that look wrong are problems (else
    warnings)."""
    n = len(dataset)
    count = n if max_samples is None else min(n, int(max_samples))
    scale = float(dataset.depth_scale)
    max_depth = getattr(dataset, "max_depth", None)
    report = DepthCheckReport(dataset=repr(dataset), num_samples=n, num_checked=count, depth_scale=scale)
    report.problems += indexing_problems(dataset)
    for i in sample_indices(count, progress):
        image_path, depth_path = dataset.image_path(i), dataset.depth_path(i)
        if image_path is not None and depth_path is None:
            continue  # missing depth map: already in dataset.problems
        before = len(report.problems)
        _, depth = read_pair(dataset, i, dataset.load_depth, depth_path, "depth", "depth map", report.problems)
        if len(report.problems) > before or depth is None:
            continue
        where = depth_path or image_path or dataset.sample_name(i)
        bits = depth_bit_depth(depth_path) if depth_path is not None else None
        values = depth.numpy().reshape(-1)
        valid = values[values > 0]
        metres = valid.astype(np.float64) / scale
        fault = depth_units_fault(metres, scale, max_depth, bits) if valid.size else None
        if fault is not None and units_are_problems:
            report.problems.append(Problem(where, f"{fault}; {SCALE_HINT}"))
            continue  # the statistics describe the usable samples only
        if fault is not None:
            report.warnings.append(Problem(where, f"{fault}; {SCALE_HINT}"))
        if bits == 8 and (fault is None or "8-bit" not in fault):
            report.warnings.append(Problem(where, "8-bit depth map: at most 255 depth levels (a visualisation?); "
                                                  "store depth as 16-bit PNG or float TIFF"))
        report.num_usable += 1
        report.valid_pixels += int(valid.size)
        report.invalid_pixels += int(values.size - valid.size)
        if valid.size == 0:
            report.warnings.append(Problem(where, "no valid depth pixel: this sample scores NaN and is left out of the metrics"))
            continue
        invalid_share = 1.0 - valid.size / values.size
        if invalid_share > HIGH_INVALID_SHARE:
            report.warnings.append(Problem(where, f"{100 * invalid_share:.1f}% of the pixels have no depth"))
        report.median_depths.append(float(np.median(metres)))
        report.min_depth = min(report.min_depth, float(metres.min()))
        report.max_depth = max(report.max_depth, float(metres.max()))
    return report


def format_depth_report(report: DepthCheckReport, max_problems: int = 50) -> str:
    lines = report_lines(report, "samples", max_problems)
    if report.median_depths:
        medians = np.asarray(report.median_depths)
        lines.append(
            f"Depth over the {report.num_usable} samples without problems (depth_scale {report.depth_scale:g} per metre): "
            f"{report.min_depth:.3g}-{report.max_depth:.3g} m, per-image median {np.median(medians):.3g} m "
            f"({medians.min():.3g}-{medians.max():.3g}); {100 * report.invalid_share:.2f}% of the pixels have no depth"
        )
    return "\n".join(lines)
