"""check-data for detection datasets: every bad annotation and image by file, then per-category box counts.

Problems (errors), found while indexing the annotation file (over the whole file, whatever ``max_samples``):
a box outside its image, a negative size, a bbox that is not four numbers, an unknown category or image id, a
duplicate image / annotation / category id, a missing image; then, image by image: an unreadable or corrupt
image, an image whose size is not the one its annotations give. Warnings: boxes without area (left out of
training), images with an EXIF rotation (ignored: pixels are used as stored, as the boxes were given). The
histogram counts the boxes of the usable images per category, crowd boxes apart (they are ignored regions, never
training targets), and marks the categories that never occur (Roboflow's super-category of id 0, say).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .check_common import Problem, indexing_problems, report_lines, sample_indices
from .datasets.common import size_mismatch
from .io import DatasetError, exif_orientation


@dataclass
class DetectionCheckReport:
    dataset: str
    num_samples: int
    num_checked: int
    category_names: dict[int, str]  # category id -> name, ids sorted
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    num_usable: int = 0  # checked images without problems: the counts describe these
    boxes: dict[int, int] = field(default_factory=dict)  # category id -> boxes (crowd ones apart)
    images: dict[int, int] = field(default_factory=dict)  # category id -> images holding one
    crowd_boxes: dict[int, int] = field(default_factory=dict)  # category id -> crowd regions
    images_without_boxes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, max_problems: int = 50) -> str:
        return format_detection_report(self, max_problems)


def check_detection_dataset(dataset, max_samples: int | None = None, progress: bool = False) -> DetectionCheckReport:
    """Read every image of `dataset` (a `DetectionDataset` built with ``strict=False``) once, before transforms,
    and collect the problems by file; never stops at the first one and never raises on a bad file."""
    n = len(dataset)
    count = n if max_samples is None else min(n, int(max_samples))
    names = dict(dataset.category_names)
    report = DetectionCheckReport(dataset=repr(dataset), num_samples=n, num_checked=count, category_names=names,
                                  boxes=dict.fromkeys(names, 0), images=dict.fromkeys(names, 0),
                                  crowd_boxes=dict.fromkeys(names, 0))
    report.problems += indexing_problems(dataset)
    report.warnings += [Problem(p, f) for p, f in getattr(dataset, "warnings", [])]
    for i in sample_indices(count, progress):
        ann = dataset.annotations(i)
        path = dataset.image_path(i) or ann.name
        try:
            image = dataset.load_image(i)
        except Exception as e:
            reason = e.reason if isinstance(e, DatasetError) and e.reason else f"unreadable or corrupt image: {e}"
            report.problems.append(Problem(path, reason))
            continue
        if tuple(image.shape[-2:]) != (ann.height, ann.width):
            report.problems.append(Problem(path, size_mismatch("annotations", path, tuple(image.shape[-2:]),
                                                               (ann.height, ann.width))))
            continue
        if dataset.image_path(i) is not None and exif_orientation(path) != 1:
            report.warnings.append(Problem(path, f"EXIF orientation {exif_orientation(path)} is ignored (pixels and "
                                                 "boxes used as stored)"))
        report.num_usable += 1
        crowd = ann.iscrowd
        if int((~crowd).sum()) == 0:
            report.images_without_boxes += 1
        for c in ann.category_ids[crowd].tolist():
            report.crowd_boxes[c] += 1
        for c in ann.category_ids[~crowd].tolist():
            report.boxes[c] += 1
        for c in set(ann.category_ids[~crowd].tolist()):
            report.images[c] += 1
    return report


def format_detection_report(report: DetectionCheckReport, max_problems: int = 50) -> str:
    lines = report_lines(report, "images", max_problems)
    total = sum(report.boxes.values())
    lines.append(f"Per-category boxes of the {report.num_usable} images without problems: {total:,} boxes, "
                 f"{sum(report.crowd_boxes.values()):,} crowd regions, {report.images_without_boxes:,} images without boxes")
    width = max([len(n) for n in report.category_names.values()] + [8])
    lines.append(f"  {'id':>4}  {'category':<{width}}  {'boxes':>10}  {'share':>7}  {'images':>7}  {'crowd':>6}")
    for c, name in report.category_names.items():
        boxes = report.boxes[c]
        share = 100.0 * boxes / total if total else 0.0
        note = "  <- never occurs" if boxes == 0 and report.num_usable else ""
        lines.append(f"  {c:>4}  {name:<{width}}  {boxes:>10,}  {share:>6.2f}%  {report.images[c]:>7,}  "
                     f"{report.crowd_boxes[c]:>6,}{note}")
    return "\n".join(lines)
