"""Detection evaluation: sharded over processes without duplicates, every process detecting its own images, the
detections gathered on rank 0 and scored there by pycocotools; what the task writes (`results-detection.csv` /
`.json`, `detections.json`)."""

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from ...engine import distributed, reporting
from ...engine.files import write_atomically
from ...models.frozen import set_train_mode
from ...models.precision import weights_autocast
from .metrics import COCO_STAT_NAMES, CocoEvaluator, DetectionMetrics, to_coco_results, write_detections

RESULTS_FILENAME = "results-detection.csv"  # the 12 COCO numbers, one row
METRICS_FILENAME = "results-detection.json"  # the same, AP per category, the counts
DETECTIONS_FILENAME = "detections.json"  # COCO results: original category ids, XYWH in original pixels

_COLUMNS = ("image_id", "category_id", "x", "y", "w", "h", "score")


def _pack(detections: list[dict]) -> np.ndarray:
    """COCO results as one float64 array (one row each), compact to gather between processes."""
    rows = [(d["image_id"], d["category_id"], *d["bbox"], d["score"]) for d in detections]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(_COLUMNS))


def _unpack(rows: np.ndarray) -> list[dict]:
    return [{"image_id": int(r[0]), "category_id": int(r[1]), "bbox": [float(v) for v in r[2:6]], "score": float(r[6])}
            for r in rows]


@torch.no_grad()
def detect(model, loader, postprocess, device: torch.device, *, label_to_category_id=None,
           autocast_dtype: torch.dtype | None = None, progress: bool = True) -> tuple[list[int], list[dict]]:
    """This process's images of `loader` (batches of `util.misc.collate_fn`) through `model` (eval mode) and
    `postprocess` (`PostProcess`, at the network input size); returns (image ids, their COCO results in original
    pixels and category ids)."""
    was_training = model.training
    model.eval()
    image_ids, detections = [], []
    with reporting.progress(desc="eval", leave=False, iterable=loader, disable=not progress) as bar:
        for samples, targets in bar:
            with weights_autocast(model, device.type, autocast_dtype):
                outputs = model(samples.to(device))
            outputs = {k: v.float() for k, v in outputs.items() if k in ("pred_logits", "pred_boxes")}
            sizes = torch.stack([t["size"] for t in targets]).to(device)
            detections += to_coco_results(postprocess(outputs, target_sizes=sizes), targets, label_to_category_id)
            image_ids += [int(t["image_id"]) for t in targets]
    set_train_mode(model, was_training)
    return image_ids, detections


def gather_detections(image_ids: list[int], detections: list[dict]) -> tuple[list[int], list[dict]] | None:
    """Every process's (image ids, detections) on rank 0, by image id (each image's detections in their order);
    None on the other ranks. An image evaluated twice is an error: the shards must not overlap."""
    gathered = distributed.all_gather_object((image_ids, _pack(detections)))
    if not distributed.is_main_process():
        return None
    ids = [i for part, _ in gathered for i in part]
    if len(set(ids)) != len(ids):
        raise RuntimeError("evaluation shards overlap: an image was evaluated by two processes")
    rows = np.concatenate([r for _, r in gathered])
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    return sorted(ids), _unpack(rows)


def evaluate_detector(model, loader, postprocess, evaluator: CocoEvaluator, device: torch.device, *,
                      label_to_category_id=None, autocast_dtype: torch.dtype | None = None,
                      progress: bool = True) -> tuple[DetectionMetrics, list[dict]] | tuple[None, None]:
    """The COCO box metrics of `model` on `loader`'s images (sharded over the processes without duplicates): each
    process detects its images, rank 0 gathers them and scores them against `evaluator`'s ground truth, on the
    evaluated images only. Returns (metrics, detections) on rank 0, (None, None) elsewhere. Collective."""
    image_ids, detections = detect(model, loader, postprocess, device, label_to_category_id=label_to_category_id,
                                   autocast_dtype=autocast_dtype, progress=progress)
    gathered = gather_detections(image_ids, detections)
    if gathered is None:
        return None, None
    ids, detections = gathered
    return evaluator.evaluate(detections, ids), detections


def scores_of(metrics: DetectionMetrics) -> dict[str, float | None]:
    """The 12 COCO numbers for metrics.jsonl (None where COCO has none)."""
    return {k: (None if math.isnan(v) else v) for k, v in metrics.stats.items()}


def format_results(metrics: DetectionMetrics) -> str:
    """The per-category AP table, then the 12 COCO numbers in percent."""
    summary = "  ".join(f"{k} {'nan' if math.isnan(v) else f'{100 * v:.1f}'}" for k, v in metrics.stats.items())
    return (f"{metrics.format_table()}\n{summary}\n({metrics.num_images} images, {metrics.num_detections} "
            "detections)")


def write_results(metrics: DetectionMetrics, detections: list[dict], output_dir: Path) -> None:
    """`results-detection.csv` (one row: the 12 COCO numbers, fractions), `results-detection.json` (those, AP per
    category, the counts; NaN written as null) and `detections.json` (COCO results) in `output_dir`."""
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(COCO_STAT_NAMES)
    writer.writerow(["nan" if math.isnan(metrics.stats[k]) else f"{metrics.stats[k]:.6f}" for k in COCO_STAT_NAMES])
    write_atomically(output_dir / RESULTS_FILENAME, lambda f: f.write(table.getvalue().encode()))
    text = json.dumps(metrics.to_dict(), indent=2)
    write_atomically(output_dir / METRICS_FILENAME, lambda f: f.write(text.encode()))
    write_detections(output_dir / DETECTIONS_FILENAME, detections)
