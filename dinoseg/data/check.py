"""``dinoseg check-data``: walk a dataset once, report every problem by file, then a per-class histogram.

Faults found: missing mask for an image (or a listed image that does not exist), empty split, unreadable or
corrupt image / mask, image/mask size mismatch, label values that are neither a class nor ignore (reported
with the values found in the file). Warnings (not errors): masks with no labelled pixel, images with an
EXIF rotation (ignored: pixels are used as stored, like the masks), classes that never occur.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from .check_common import Problem, indexing_problems, read_pair, report_lines, sample_indices
from .datasets.coco import DetectionDataset
from .datasets.depth_base import DepthDataset
from .io import DatasetError, exif_orientation


@dataclass
class CheckReport:
    dataset: str
    num_samples: int
    num_checked: int
    class_names: list[str]
    ignore_index: int
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    class_pixels: np.ndarray | None = None  # [num_classes] labelled pixels per class
    class_images: np.ndarray | None = None  # [num_classes] number of images containing the class
    ignore_pixels: int = 0
    num_usable: int = 0  # checked samples without problems: the histogram counts these

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, max_problems: int = 50) -> str:
        return format_report(self, max_problems)


def _raw_values_at(dataset, index: int, bad: torch.Tensor) -> str:
    """The values stored in the mask file where the train-id label is invalid (more telling than train ids)."""
    try:
        raw = torch.from_numpy(dataset.load_raw_mask(index))
    except Exception:
        return ""
    if raw.shape != bad.shape:
        return ""
    values = torch.unique(raw[bad]).tolist()
    return f"; values in the file: {values[:8]}{' ...' if len(values) > 8 else ''}"


def check_dataset(dataset, max_samples: int | None = None, progress: bool = False) -> CheckReport:
    """Read every sample (image and label, before transforms) and collect problems per file; never stops at
    the first one and never raises on a bad file."""
    n = len(dataset)
    count = n if max_samples is None else min(n, int(max_samples))
    num_classes = int(dataset.num_classes)
    ignore = int(dataset.ignore_index)
    report = CheckReport(
        dataset=repr(dataset),
        num_samples=n,
        num_checked=count,
        class_names=list(dataset.class_names),
        ignore_index=ignore,
        class_pixels=np.zeros(num_classes, dtype=np.int64),
        class_images=np.zeros(num_classes, dtype=np.int64),
    )
    report.problems += indexing_problems(dataset)
    for i in sample_indices(count, progress):
        image_path, mask_path = dataset.image_path(i), dataset.mask_path(i)
        if image_path is not None and mask_path is None:
            continue  # missing mask: already in dataset.problems
        problems_before = len(report.problems)
        image, label = read_pair(dataset, i, dataset.load_label, mask_path, "mask", "mask", report.problems)
        if image_path is not None and image is not None and exif_orientation(image_path) != 1:
            report.warnings.append(
                Problem(image_path, f"EXIF orientation {exif_orientation(image_path)} is ignored (pixels used as stored)")
            )
        if label is None:
            continue
        name = image_path or dataset.sample_name(i)
        bad = ((label < 0) | (label >= num_classes)) & (label != ignore)
        if bool(bad.any()):
            fault = dataset.label_fault(label)
            report.problems.append(
                Problem(mask_path or name, f"{fault}: {int(bad.sum())} pixels{_raw_values_at(dataset, i, bad)}")
            )
        if len(report.problems) > problems_before:
            continue  # the histogram describes the usable samples only
        valid = label[label != ignore]
        if valid.numel() == 0:
            report.warnings.append(Problem(mask_path or name, "mask has no labelled pixel (all ignore)"))
        counts = torch.bincount(valid.flatten(), minlength=num_classes).numpy()
        report.class_pixels += counts
        report.class_images += counts > 0
        report.ignore_pixels += label.numel() - valid.numel()
        report.num_usable += 1
    return report


def format_report(report: CheckReport, max_problems: int = 50) -> str:
    lines = report_lines(report, "samples", max_problems)
    if report.class_pixels is not None:
        labelled = int(report.class_pixels.sum())
        total = labelled + report.ignore_pixels
        share = 100.0 * report.ignore_pixels / total if total else 0.0
        lines.append(
            f"Per-class pixel histogram of the {report.num_usable} samples without problems: "
            f"{labelled:,} labelled pixels, {report.ignore_pixels:,} ignored "
            f"(value {report.ignore_index}, {share:.2f}%)"
        )
        width = max([len(n) for n in report.class_names] + [5])
        lines.append(f"  {'id':>3}  {'class':<{width}}  {'pixels':>14}  {'share':>7}  {'images':>7}")
        for k, name in enumerate(report.class_names):
            px = int(report.class_pixels[k])
            pct = 100.0 * px / labelled if labelled else 0.0
            note = "  <- never occurs" if px == 0 and report.num_checked else ""
            lines.append(f"  {k:>3}  {name:<{width}}  {px:>14,}  {pct:>6.2f}%  {int(report.class_images[k]):>7}{note}")
    return "\n".join(lines)


def _load_spec(text: str):
    """A dataset string (``ADE20K:split=VAL:root=...``) or a JSON / YAML file holding a dataset mapping."""
    if os.path.isfile(text) and text.endswith((".json", ".yaml", ".yml")):
        if text.endswith(".json"):
            with open(text, encoding="utf-8") as f:
                return json.load(f)
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(text), resolve=True)
    return text


def main(argv: list[str] | None = None) -> int:
    """``check-data DATASET``: exit code 0 when no problem was found, 1 otherwise (2 when the dataset cannot
    even be built)."""
    from . import make_dataset

    parser = argparse.ArgumentParser(prog="dinoseg check-data", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help='dataset string, e.g. "ADE20K:split=VAL:root=/data/ade", or a YAML/JSON file')
    parser.add_argument("--root", default=None, help="dataset root (overrides the one in DATASET)")
    parser.add_argument("--split", default=None, help="split (overrides the one in DATASET)")
    parser.add_argument("--max-samples", type=int, default=None, help="check only the first N samples")
    parser.add_argument("--max-problems", type=int, default=50, help="problems listed in full")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("root", args.root), ("split", args.split)) if v is not None}
    try:
        dataset = make_dataset(_load_spec(args.dataset), strict=False, **overrides)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        print(f"check-data: {e}", file=sys.stderr)
        return 2
    if isinstance(dataset, DepthDataset):
        from .depth_check import check_depth_dataset, format_depth_report

        report = check_depth_dataset(dataset, max_samples=args.max_samples, progress=not args.no_progress)
        print(format_depth_report(report, args.max_problems))
        return 0 if report.ok else 1
    if isinstance(dataset, DetectionDataset):
        from .detection_check import check_detection_dataset, format_detection_report

        report = check_detection_dataset(dataset, max_samples=args.max_samples, progress=not args.no_progress)
        print(format_detection_report(report, args.max_problems))
        return 0 if report.ok else 1
    report = check_dataset(dataset, max_samples=args.max_samples, progress=not args.no_progress)
    print(format_report(report, args.max_problems))
    return 0 if report.ok else 1
