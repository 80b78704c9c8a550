"""COCO box evaluation by pycocotools (the reference implementation), quiet, from a flat list of detections.

Detections are in the COCO results format: one dict per box, ``{"image_id": int, "category_id": int (the
dataset's own id), "bbox": [x, y, w, h] in pixels of the original image, "score": float}``; `to_coco_results`
makes them from the detector's post-processed outputs and `write_detections` writes ``detections.json``.

An evaluation pass (sharded or not) goes::

    results = []
    for images, targets in loader:                      # eval transforms, `util.misc.collate_fn`
        outputs = postprocess(model(images), target_sizes=sizes)    # per image scores, labels, boxes XYXY in
        results += to_coco_results(outputs, targets, dataset.label_to_category_id)   # network-input pixels
    # (gather `results` and the evaluated image ids of every process: each image exactly once)
    metrics = CocoEvaluator(dataset).evaluate(results, image_ids)   # image_ids: the images evaluated
    metrics.stats["AP"], metrics.per_category_ap["person"], metrics.summary

The ground truth comes from the dataset (`DetectionDataset.coco_gt`) or the COCO file: crowd boxes are
ignored regions and ``area`` decides small / medium / large, exactly as pycocotools does for the official
numbers. Images without annotations count (their detections are false positives); no detection at all gives
AP 0. Stats pycocotools cannot define (no ground-truth box of that size range) are NaN, not its -1.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ...data.io import DatasetError
from ...engine.files import write_atomically

if TYPE_CHECKING:  # pycocotools is imported where it evaluates, not with the task's code
    from pycocotools.coco import COCO

# pycocotools' `COCOeval.stats`, in its order.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class DetectionMetrics:
    """What `CocoEvaluator.evaluate` gives: ``stats`` (the 12 COCO numbers by `COCO_STAT_NAMES`, fractions, NaN
    where undefined), ``per_category_ap`` (AP@[.5:.95] per category name, NaN for a category without
    ground truth in the evaluated images), ``summary`` (pycocotools' printed table), the counts evaluated."""

    stats: dict[str, float]
    per_category_ap: dict[str, float]
    num_images: int
    num_detections: int
    summary: str = field(repr=False, default="")

    def to_dict(self) -> dict:
        """JSON-ready: the stats, ``per_category_AP`` and the counts (NaN written as null)."""
        def clean(v: float) -> float | None:
            return None if math.isnan(v) else v

        return {**{k: clean(v) for k, v in self.stats.items()},
                "per_category_AP": {k: clean(v) for k, v in self.per_category_ap.items()},
                "num_images": self.num_images, "num_detections": self.num_detections}

    def format_table(self, digits: int = 1) -> str:
        """Per-category AP in percent, one row per category."""
        width = max([len(n) for n in self.per_category_ap] + [len("Category")])
        lines = [f"{'Category':<{width}}  {'AP':>{digits + 5}}"]
        for name, ap in self.per_category_ap.items():
            lines.append(f"{name:<{width}}  {'nan' if math.isnan(ap) else f'{100 * ap:.{digits}f}':>{digits + 5}}")
        return "\n".join(lines)


def _read_coco_file(path) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"annotation file not found: {path}", path, "annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable JSON file: {type(e).__name__}: {e}") from None


def coco_ground_truth(ground_truth) -> COCO:
    """A pycocotools ``COCO`` from a detection dataset (its ``coco_gt()``), a COCO file or a COCO dict. Fields
    that exporters omit and pycocotools needs are filled in a copy: ``iscrowd`` 0, ``area`` the box area."""
    from pycocotools.coco import COCO

    if hasattr(ground_truth, "coco_gt"):
        data = ground_truth.coco_gt()
    elif isinstance(ground_truth, (str, os.PathLike)):
        data = _read_coco_file(ground_truth)
    elif isinstance(ground_truth, Mapping):
        data = ground_truth
    else:
        raise TypeError(f"ground truth must be a detection dataset, a COCO file or a COCO dict, "
                        f"got {type(ground_truth).__name__}")
    if not isinstance(data, Mapping) or not isinstance(data.get("images"), list) or not isinstance(data.get("categories"), list):
        raise DatasetError("ground truth is not a COCO dict with 'images' and 'categories' lists")
    annotations = []
    for ann in data.get("annotations", []):
        ann = dict(ann)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        annotations.append(ann)
    gt = COCO()
    gt.dataset = {"images": list(data["images"]), "annotations": annotations, "categories": list(data["categories"])}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _category_labels(categories: Sequence[dict]) -> dict[int, str]:
    """Category id -> a unique name (a name shared by several categories gets its id appended)."""
    names = [str(c.get("name", c["id"])) for c in categories]
    return {c["id"]: (n if names.count(n) == 1 else f"{n} (id {c['id']})") for c, n in zip(categories, names)}


class CocoEvaluator:
    """COCO box AP / AR of detections against one ground truth (a detection dataset, a COCO file or dict),
    loaded and indexed once; `evaluate` may be called for any detections and any subset of its images."""

    def __init__(self, ground_truth):
        self.coco_gt = coco_ground_truth(ground_truth)
        self.category_names = _category_labels(self.coco_gt.dataset["categories"])
        self.image_ids = sorted(self.coco_gt.getImgIds())

    def _checked(self, detections: Sequence[Mapping], image_ids: set[int]) -> list[dict]:
        """Copies of `detections` with plain Python numbers (pycocotools adds keys to what it is given)."""
        out = []
        for k, det in enumerate(detections):
            try:
                image_id, category_id = det["image_id"], det["category_id"]
                bbox = [float(v) for v in det["bbox"]]
                score = float(det["score"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"detection #{k} is not a COCO result (image_id, category_id, bbox [x, y, w, h], "
                                 f"score): {type(e).__name__}: {e}") from None
            image_id, category_id = int(image_id), int(category_id)
            if image_id not in image_ids:
                raise ValueError(f"detection #{k}: image_id {image_id} is not one of the evaluated images")
            if category_id not in self.category_names:
                raise ValueError(f"detection #{k}: category_id {category_id} is not a category of the ground truth "
                                 f"({sorted(self.category_names)}); labels need mapping to category ids")
            if len(bbox) != 4 or not all(math.isfinite(v) for v in [*bbox, score]):
                raise ValueError(f"detection #{k}: bbox {det['bbox']} and score {det['score']} must be 4 + 1 finite numbers")
            out.append({"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score})
        return out

    def evaluate(self, detections: Sequence[Mapping], image_ids: Iterable[int] | None = None) -> DetectionMetrics:
        """Evaluate `detections` (COCO results, each image's exactly once) on `image_ids` (default: every image
        of the ground truth). A detection of an image outside `image_ids` or of an unknown category is an
        error, not a silent zero."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        ids = self.image_ids if image_ids is None else sorted({int(i) for i in image_ids})
        unknown = sorted(set(ids) - set(self.image_ids))
        if unknown:
            raise ValueError(f"image ids {unknown[:5]} are not in the ground truth")
        results = self._checked(detections, set(ids))
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            if results:
                coco_dt = self.coco_gt.loadRes(results)
            else:  # pycocotools' loadRes cannot take an empty list
                coco_dt = COCO()
                coco_dt.dataset = {"images": list(self.coco_gt.dataset["images"]), "annotations": [],
                                   "categories": copy.deepcopy(self.coco_gt.dataset["categories"])}
                coco_dt.createIndex()
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            coco_eval.params.imgIds = ids
            if ids:
                coco_eval.evaluate()
                coco_eval.accumulate()
                start = len(log.getvalue())
                coco_eval.summarize()
        if not ids:
            nan = float("nan")
            return DetectionMetrics({k: nan for k in COCO_STAT_NAMES}, {n: nan for n in self.category_names.values()},
                                    0, len(results))
        stats = {k: (float(v) if v > -1 else float("nan")) for k, v in zip(COCO_STAT_NAMES, coco_eval.stats)}
        # precision: [IoU thresholds, recall points, categories, area ranges (all first), max dets (100 last)]
        precision = coco_eval.eval["precision"]
        per_category = {}
        for k, category_id in enumerate(coco_eval.params.catIds):
            p = precision[:, :, k, 0, -1]
            per_category[self.category_names[category_id]] = float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
        return DetectionMetrics(stats, per_category, len(ids), len(results), log.getvalue()[start:])


def evaluate_detections(ground_truth, detections: Sequence[Mapping], image_ids: Iterable[int] | None = None) -> DetectionMetrics:
    """`CocoEvaluator(ground_truth).evaluate(detections, image_ids)`, for one evaluation."""
    return CocoEvaluator(ground_truth).evaluate(detections, image_ids)


def to_coco_results(outputs: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]],
                    label_to_category_id: Mapping[int, int] | None = None) -> list[dict]:
    """COCO results from post-processed detector outputs: per image ``scores`` [K], ``labels`` [K] and ``boxes``
    [K, 4] XYXY in pixels of the network input (``PostProcess`` with ``target_sizes`` = the targets' ``size``),
    with the image's target (``image_id``, ``size`` (H, W) after the eval transforms, ``orig_size`` (H, W)).

    Boxes are scaled back to the original image (the inverse of the eval resize, per axis), clamped to it and
    written XYWH; labels become category ids through `label_to_category_id` (``dataset.label_to_category_id``;
    None: the labels are category ids already); a label of no category (an unused id of a 91-class head) is
    dropped."""
    if len(outputs) != len(targets):
        raise ValueError(f"{len(outputs)} outputs for {len(targets)} targets")
    results = []
    for out, target in zip(outputs, targets):
        image_id = int(target["image_id"])
        in_h, in_w = (float(v) for v in torch.as_tensor(target["size"]).tolist())
        orig_h, orig_w = (float(v) for v in torch.as_tensor(target["orig_size"]).tolist())
        boxes = out["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
        boxes = boxes * torch.tensor([orig_w / in_w, orig_h / in_h, orig_w / in_w, orig_h / in_h], dtype=torch.float64)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, orig_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, orig_h)
        boxes[:, 2:] -= boxes[:, :2]
        scores = out["scores"].detach().to("cpu", torch.float64).reshape(-1).tolist()
        labels = out["labels"].detach().cpu().reshape(-1).tolist()
        for box, score, label in zip(boxes.tolist(), scores, labels):
            category_id = int(label) if label_to_category_id is None else label_to_category_id.get(int(label))
            if category_id is not None:
                results.append({"image_id": image_id, "category_id": category_id, "bbox": box, "score": score})
    return results


def write_detections(path, detections: Sequence[Mapping]) -> Path:
    """Write `detections` (COCO results) to `path` (``detections.json``) atomically: what pycocotools'
    ``COCO.loadRes`` and the COCO evaluation server read."""
    path = Path(path)
    write_atomically(path, lambda f: f.write(json.dumps(list(detections)).encode("utf-8")))
    return path
