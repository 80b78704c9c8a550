"""Evaluation: sharded over processes without duplicates, metric sums all-reduced, results written by rank 0."""

import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from ... import distributed
from ...data.loaders import make_data_loader
from .inference import make_tta_inference
from .metrics import SEGMENTATION_METRICS, SUMMARY_NAMES, SegmentationMetrics, format_per_class_table
from .setup import inference_kwargs

logger = logging.getLogger("dinoseg")

RESULTS_FILENAME = "results-semantic-segmentation.csv"
METRICS_FILENAME = "results-semantic-segmentation.json"


def make_val_loader(dataset, cfg: DictConfig) -> torch.utils.data.DataLoader:
    """Batch size 1 (images keep their own sizes, labels their original resolution), sharded over ranks
    without padding, so every sample is counted exactly once."""
    if cfg.eval.max_val_samples is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(len(dataset), cfg.eval.max_val_samples)))
    return make_data_loader(dataset, batch_size=1, num_workers=min(cfg.train.num_workers, 2), shuffle=False,
                            seed=cfg.seed, pad_shards=False)


def whole_image_size(image: torch.Tensor, model) -> tuple[int, int]:
    """Whole-image mode runs at the eval resize, rounded up to the backbone's patch grid (a ConvNeXt without
    pseudo patch size: its coarsest stride, 32)."""
    patch = getattr(model.segmentation_model[0], "patch_size", None) or 32
    return tuple(-(-s // patch) * patch for s in image.shape[-2:])


@torch.no_grad()
def evaluate_segmentation_model(model, loader, cfg: DictConfig, num_classes: int, device: torch.device,
                                class_names=None, save_dir: Path | None = None, progress: bool = True) -> dict:
    """Dataset metrics (identical on every rank) of `model` on `loader`'s shard, all-reduced over ranks."""
    was_training = model.training
    model.eval()
    kwargs = inference_kwargs(cfg)
    metrics = SegmentationMetrics(num_classes=num_classes, ignore_index=255, class_names=class_names, device=device)
    show = progress and distributed.is_main_process()
    for index, (image, label) in zip(loader.sampler, tqdm(loader, desc="eval", disable=not show, leave=False,
                                                             mininterval=0.1 if sys.stderr.isatty() else 10.0)):
        image = image.to(device)
        label = label[0].to(device)
        if kwargs["inference_mode"] == "whole":
            kwargs["crop_size"] = whole_image_size(image, model)
        probs = make_tta_inference(image, model, rescale_to=tuple(label.shape[-2:]), **kwargs)
        pred = probs.argmax(dim=1)[0]
        metrics.update(pred, label)
        if save_dir is not None:
            name = _sample_name(loader.dataset, index)
            Image.fromarray(pred.to(torch.uint8).cpu().numpy()).save(save_dir / f"{Path(name).stem}.png")
    metrics.all_reduce()
    model.train(was_training)
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
    with open(output_dir / RESULTS_FILENAME, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(row))
        writer.writerow([f"{v:.6f}" for v in row.values()])
    with open(output_dir / METRICS_FILENAME, "w") as f:
        json.dump(results, f, indent=2, default=float)
