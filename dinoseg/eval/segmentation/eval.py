"""Evaluation: sharded over processes without duplicates, metric sums all-reduced, results written by rank 0."""

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...data.datasets.base import IGNORE_INDEX
from ...engine import reporting
from ...engine.files import write_atomically
from ...models.frozen import set_train_mode
from .inference import AccumulatorBuffer, InferenceSettings
from .metrics import SEGMENTATION_METRICS, SUMMARY_NAMES, SegmentationMetrics, format_per_class_table

logger = logging.getLogger("dinoseg")

RESULTS_FILENAME = "results-semantic-segmentation.csv"
METRICS_FILENAME = "results-semantic-segmentation.json"


@torch.no_grad()
def evaluate_segmentation_model(model, loader, settings: InferenceSettings, num_classes: int, device: torch.device,
                                class_names=None, save_dir: Path | None = None, progress: bool = True) -> dict:
    """Dataset metrics (identical on every rank) of `model` on `loader`'s shard, all-reduced over ranks."""
    was_training = model.training
    model.eval()
    buffer = AccumulatorBuffer()  # one sliding-window accumulator for the whole loop
    metrics = SegmentationMetrics(num_classes=num_classes, ignore_index=IGNORE_INDEX, class_names=class_names,
                                  device=device)
    with reporting.progress(desc="eval", leave=False, iterable=loader, disable=not progress) as bar:
        for index, (image, label) in zip(loader.sampler, bar):
            image = image.to(device)
            label = label[0].to(device)
            probs = settings(image, model, rescale_to=tuple(label.shape[-2:]), buffer=buffer)
            pred = probs.argmax(dim=1)[0]
            metrics.update(pred, label)
            if save_dir is not None:
                name = _sample_name(loader.dataset, index)
                Image.fromarray(pred.to(torch.uint8).cpu().numpy()).save(save_dir / f"{Path(name).stem}.png")
    metrics.all_reduce()
    set_train_mode(model, was_training)
    results = metrics.compute()
    per_class = metrics.per_class()
    results["per_class"] = {
        "class_names": list(class_names) if class_names is not None else [str(i) for i in range(num_classes)],
        **{k: [None if np.isnan(v) else float(v) for v in per_class[k].tolist()] for k in per_class},
    }
    results["num_samples"] = metrics.num_samples
    return results


def format_metrics_table(results: dict) -> str:
    """Per-class table (percent) followed by the dataset summary."""
    per_class = {k: torch.tensor([np.nan if v is None else v for v in vals], dtype=torch.float64)
                 for k, vals in results["per_class"].items() if k != "class_names"}
    table = format_per_class_table(per_class, results["per_class"]["class_names"])
    summary = "  ".join(f"{k} {100 * results[k]:.2f}" for k in SUMMARY_NAMES.values() if k in results)
    return f"{table}\n{summary}  ({results['num_samples']} images)"


def _sample_name(dataset, index: int) -> str:
    if isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    return dataset.sample_name(index) if hasattr(dataset, "sample_name") else f"{index:06d}"


def write_results(results: dict, output_dir: Path) -> None:
    """The official one-row CSV of dataset metrics, plus a JSON with every metric and the per-class table."""
    # Official column names (mIoU, acc, aAcc, dice, fscore, precision, recall), fractions as the official code.
    row = {name: results[SUMMARY_NAMES[name]] for name in SEGMENTATION_METRICS}
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(list(row))
    writer.writerow([f"{v:.6f}" for v in row.values()])
    write_atomically(output_dir / RESULTS_FILENAME, lambda f: f.write(table.getvalue().encode()))
    text = json.dumps(results, indent=2, default=float)
    write_atomically(output_dir / METRICS_FILENAME, lambda f: f.write(text.encode()))
