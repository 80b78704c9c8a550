"""Evaluation: sharded over processes without duplicates, metric sums all-reduced, results written by rank 0."""

import csv
import io
import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...data.datasets.base import IGNORE_INDEX
from ...engine import reporting
from ...engine.files import write_atomically
from ...models.frozen import set_train_mode
from .inference import AccumulatorBuffer, InferenceSettings, make_inference
from .metrics import (
    SEGMENTATION_METRICS,
    SUMMARY_NAMES,
    SegmentationMetrics,
    calculate_segmentation_metrics,
    format_per_class_table,
)

logger = logging.getLogger("dinoseg")

RESULTS_FILENAME = "results-semantic-segmentation.csv"
MAIN_METRICS = ["mIoU"]
_SOFTMAX = partial(F.softmax, dim=1)
METRICS_FILENAME = "results-semantic-segmentation.json"


@torch.no_grad()
def evaluate_segmentation_model(segmentation_model, test_dataloader, device, eval_res=None, eval_stride=None,
                                decoder_head_type="linear", num_classes=None, autocast_dtype=None, *,
                                settings: InferenceSettings | None = None, class_names=None,
                                save_dir: Path | None = None, progress: bool = True) -> dict:
    """Dataset metrics of `segmentation_model` on `test_dataloader`'s shard, reduced over ranks. Two forms:

    - official: `(segmentation_model, test_dataloader, device, eval_res, eval_stride, decoder_head_type,
      num_classes, autocast_dtype)`. Batches are `(views, (index, label))` as the official data pipeline gives
      them: `views` the image's test-time views (`make_segmentation_eval_transforms(..., use_tta=True)`: scales,
      then their horizontal flips), each predicted by sliding `eval_res` crops with stride `eval_stride`, softmaxed
      and averaged; labels are raw ADE20K-style maps (0 = ignored: `reduce_zero_label` is applied, as
      officially). Returns the official dict: mIoU, acc, aAcc, dice, fscore, precision, recall in percent,
      rounded to 2 decimals.
    - dinoseg's: `settings=` an `InferenceSettings`, `num_classes=`; batches `(image, label)` from
      `engine.training.evaluation_loader` (labels in train ids); `class_names`, `save_dir` (one PNG of class ids
      per image), `progress`. Returns `SegmentationMetrics.compute()` with `per_class` and `num_samples`.
    """
    if settings is None:
        if eval_res is None or eval_stride is None or num_classes is None:
            raise TypeError("evaluate_segmentation_model: give settings= (dinoseg's form) or eval_res, eval_stride "
                            "and num_classes (the official form)")
        return _evaluate_official(getattr(segmentation_model, "module", segmentation_model), test_dataloader,
                                  torch.device(device) if not isinstance(device, torch.device) else device,
                                  eval_res, eval_stride, decoder_head_type, num_classes, autocast_dtype)
    if num_classes is None:
        raise TypeError("evaluate_segmentation_model: settings= needs num_classes=")
    model, loader = segmentation_model, test_dataloader
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


def _evaluate_official(model, loader, device: torch.device, eval_res: int, eval_stride: int, decoder_head_type: str,
                       num_classes: int, autocast_dtype) -> dict[str, float]:
    model = model.to(device).eval()
    metrics = SegmentationMetrics(num_classes=num_classes, ignore_index=IGNORE_INDEX, reduce_zero_label=True,
                                  device=device, strict=False)  # the official histogram skips stray values
    buffer = AccumulatorBuffer()
    for views, target in loader:
        label = target[1] if isinstance(target, (tuple, list)) else target
        views = [views] if torch.is_tensor(views) else list(views)
        if autocast_dtype is not None:
            views = [v.to(dtype=autocast_dtype) for v in views]
        label = label.to(device)[0]
        label = label.reshape(label.shape[-2:])
        total = None
        for i, view in enumerate(views):
            probs = make_inference(view.to(device), model, "slide", decoder_head_type, rescale_to=tuple(label.shape),
                                   n_output_channels=num_classes, crop_size=(eval_res, eval_res),
                                   stride=(eval_stride, eval_stride), apply_horizontal_flip=i >= len(views) / 2,
                                   output_activation=_SOFTMAX, buffer=buffer)
            total = probs.clone() if total is None else total.add_(probs)
        metrics.update(total.argmax(dim=1)[0], label)
    metrics.all_reduce()
    reduced = calculate_segmentation_metrics(metrics.areas.cpu(), metrics=["mIoU", "dice", "fscore"])
    results = {k: round(float(v) * 100, 2) for k, v in reduced.items()}
    logger.info(results)
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
