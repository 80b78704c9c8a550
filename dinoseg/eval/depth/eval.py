"""Depth evaluation: the official loop over a data loader (`evaluate_depther_with_dataloader`, per-image metrics
then their NaN-mean), its config entry, and what the task writes (`results-depth.csv` / `.json`)."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...data import make_data_loader, make_dataset
from ...data.adapters import DatasetWithEnumeratedTargets
from ...engine import distributed, reporting
from ...engine.files import write_atomically
from ...models.frozen import set_train_mode
from .config import DepthConfig, ResultConfig, make_depth_eval_transforms_from_config
from .datasets.datasets_utils import make_valid_mask, parse_eval_crop
from .metrics import _DepthMetric, calculate_depth_metrics, metrics_from_names
from .utils import align_depth_least_square
from .visualization_utils import save_predictions

logger = logging.getLogger("dinoseg")

RESULTS_FILENAME = "results-depth.csv"
METRICS_FILENAME = "results-depth.json"


def evaluate_depther_with_config(config: DepthConfig, depther: torch.nn.Module, device: Any, reduce_results: bool = True):
    """`evaluate_depther_with_dataloader` on ``config.datasets.test`` (else ``datasets.val``, under
    ``datasets.root``) with the config's eval transforms (flip TTA per ``eval.use_tta``), metrics, range, mask and
    alignment; under torch.distributed the images are sharded over the ranks without repetition."""
    dataset = make_dataset(config.datasets.test or config.datasets.val, default_root=config.datasets.root,
                           transforms=make_depth_eval_transforms_from_config(config, split="test"))
    loader = make_data_loader(DatasetWithEnumeratedTargets(dataset), batch_size=1, num_workers=config.train.num_workers,
                              shuffle=False, pad_shards=False, rank=distributed.get_rank(),
                              world_size=distributed.get_world_size())
    return evaluate_depther_with_dataloader(
        loader,
        depther,
        device=device,
        metrics=metrics_from_names(config.metrics),
        eval_range=(config.eval.min_depth, config.eval.max_depth),
        result_config=config.result_config,
        save_dir=config.output_dir,
        ignored_value=config.eval.ignored_value,
        eval_mask_type=config.transforms.eval.eval_mask,
        reduce_results=reduce_results,
        align_least_squares=config.eval.align_least_squares,
        use_tta=config.eval.use_tta,
    )


def _as_list(x) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


@torch.no_grad()
def evaluate_depther_with_dataloader(
    dataloader,
    depther: torch.nn.Module,
    device: Any,
    metrics: list[_DepthMetric],
    eval_range: tuple[float, float],
    result_config: ResultConfig | None,
    save_dir: str = "",
    ignored_value: float = 0.0,
    eval_mask_type: str = "NYU_EIGEN",
    reduce_results: bool = True,
    align_least_squares: bool = False,
    use_tta: bool = False,
):
    """Per-image depth metrics over `dataloader`, then their mean over images (NaN-mean).

    The loader yields batches of one sample, ``(images, (index, depths))`` as `DatasetWithEnumeratedTargets`
    over the eval transforms gives them: `images` a list of [1, 3, h, w] (the original, and its flipped copy
    with TTA), `depths` a list of [1, 1, H, W] in metres. Per image: the prediction (with `use_tta`, the mean
    of the prediction and the un-flipped prediction of the flipped image; the flipped copy is made here when
    the loader gives none) is resized (bilinear) to the ground truth; ground truth outside the open interval
    `eval_range` becomes `ignored_value`; the valid mask is the `eval_mask_type` crop minus ignored pixels;
    with `align_least_squares` the prediction is fitted in scale and shift to the ground truth on that mask;
    it is clamped to `eval_range` and scored. Negative indices (padding of a sharded loader) are run but not
    scored. Under torch.distributed the per-image values of all ranks are gathered.

    An image without any valid pixel scores NaN for every metric: it is left out of the means, with a warning
    that counts such images.

    `metrics`: `DEPTH_METRICS` entries or names; `result_config`: what to save (None: nothing).

    Returns ``(results, {}, indices)``: `results` maps each metric name to its mean (``reduce_results``) or to
    the list of per-image values in the order of `indices` (sorted dataset indices).
    """
    from .transforms import LeftRightFlipAug  # torchvision: imported when evaluating, not with the task's code

    metrics = metrics_from_names(metrics)
    names = [m.name for m in metrics]
    eval_crop = parse_eval_crop(eval_mask_type)
    low, high = eval_range
    flip = LeftRightFlipAug(flip=True)
    values: list[list[float]] = []
    indices: list[int] = []
    for batch_images, (index, gt_maps) in dataloader:
        images = _as_list(batch_images)
        if images[0].shape[0] != 1:
            raise ValueError(f"evaluation runs one image per batch, got a batch of {images[0].shape[0]}")
        if use_tta and len(images) == 1:
            images.append(torch.flip(images[0], dims=[-1]))
        x = torch.cat(images[: 2 if use_tta else 1]).to(device)
        preds = depther(x)
        if use_tta:
            preds = flip.inverse(preds)
        index = int(torch.as_tensor(index).reshape(-1)[0])
        if index < 0:
            continue
        gt = _as_list(gt_maps)[0].to(device=preds.device, dtype=torch.float32)
        gt = torch.where((gt >= high) | (gt <= low), torch.full_like(gt, ignored_value), gt)
        valid_mask = make_valid_mask(gt, eval_crop=eval_crop, ignored_value=ignored_value)
        if preds.shape[-2:] != gt.shape[-2:]:
            preds = F.interpolate(preds, size=gt.shape[-2:], mode="bilinear", align_corners=False)
        if align_least_squares:
            preds = align_depth_least_square(gt, preds, valid_mask)[0]
        if result_config is not None and result_config.save_results:
            save_predictions(img=x[:1], pred=preds, gt=gt, result_config=result_config, save_dir=save_dir,
                             save_index=index)
        preds = preds.clamp(min=low, max=high)
        scores = calculate_depth_metrics(gt, preds, valid_mask, list_metrics=metrics)
        values.append([float(getattr(scores, name)) for name in names])
        indices.append(index)

    if distributed.get_world_size() > 1:
        gathered = distributed.all_gather_object((indices, values))
        indices = [i for part in gathered for i in part[0]]
        values = [v for part in gathered for v in part[1]]
    order = sorted(range(len(indices)), key=indices.__getitem__)
    indices = [indices[i] for i in order]
    per_image = torch.tensor([values[i] for i in order], dtype=torch.float32).reshape(len(order), len(names))

    empty = [i for i, row in zip(indices, per_image.tolist()) if all(math.isnan(v) for v in row)]
    if empty:
        message = (f"{len(empty)} of {len(indices)} image(s) have no valid ground-truth pixel in the evaluation "
                   f"mask and range {eval_range}: left out of the mean (indices {empty[:10]})")
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    means = per_image.nanmean(dim=0) if len(indices) else torch.full((len(names),), math.nan)
    logger.info("Final scores: " + " ".join(f"{n}: {v:.3f}" for n, v in zip(names, means.tolist())))
    if reduce_results:
        results = {n: float(v) for n, v in zip(names, means.tolist())}
    else:
        results = {n: per_image[:, k].tolist() for k, n in enumerate(names)}
    return results, {}, torch.tensor(indices, dtype=torch.int64)


@dataclass(frozen=True)
class DepthEvalSettings:
    """How a depth run scores predictions (from the config's `metrics`, `eval.*` and `transforms.eval.eval_mask`)."""

    metrics: tuple[str, ...]
    eval_range: tuple[float, float]  # metres: ground truth outside is ignored, predictions clamped
    ignored_value: float
    eval_mask: str
    align_least_squares: bool
    use_tta: bool


@torch.no_grad()
def evaluate_depth_model(model, loader, settings: DepthEvalSettings, device: torch.device, *, sample_name=None,
                         result_config: ResultConfig | None = None, save_dir: Path | None = None,
                         progress: bool = True) -> dict:
    """Per-image metrics of `model` over `loader` (sharded over processes; `DatasetWithEnumeratedTargets` batches),
    gathered on every rank, then their NaN-mean as the official code reports. Returns the means (one float per
    metric, identical on every rank), ``num_samples``, ``num_without_depth`` (images without a valid pixel, left
    out of the means) and ``per_image`` (dataset index, name by `sample_name(index)`, and each metric)."""
    was_training = model.training
    model.eval()
    with reporting.progress(desc="eval", leave=False, iterable=loader, disable=not progress) as bar:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # images without depth are counted below
            per_image, _, indices = evaluate_depther_with_dataloader(
                bar, model, device, metrics=list(settings.metrics), eval_range=settings.eval_range,
                result_config=result_config, save_dir=str(save_dir or ""), ignored_value=settings.ignored_value,
                eval_mask_type=settings.eval_mask, reduce_results=False,
                align_least_squares=settings.align_least_squares, use_tta=settings.use_tta)
    set_train_mode(model, was_training)
    values = torch.tensor([per_image[name] for name in settings.metrics], dtype=torch.float32).reshape(
        len(settings.metrics), len(indices))
    means = values.nanmean(dim=1) if len(indices) else torch.full((len(settings.metrics),), math.nan)
    results: dict = {name: float(v) for name, v in zip(settings.metrics, means.tolist())}
    results["num_samples"] = len(indices)
    results["num_without_depth"] = int(values.isnan().all(dim=0).sum())
    index = indices.tolist()
    results["per_image"] = {"index": index, "name": [sample_name(i) if sample_name else str(i) for i in index],
                            **{name: [None if math.isnan(v) else v for v in per_image[name]] for name in settings.metrics}}
    return results


def format_results(results: dict, metrics) -> str:
    """One line: each metric, then the number of images."""
    text = "  ".join(f"{name} {results[name]:.4f}" for name in metrics)
    skipped = results["num_without_depth"]
    note = f", {skipped} without valid depth left out" if skipped else ""
    return f"{text}  ({results['num_samples']} images{note})"


def write_results(results: dict, output_dir: Path, dataset_name: str, metrics) -> None:
    """The official one-row CSV (columns ``<dataset>_<metric>``, e.g. ``NYU_rmse``), plus a JSON with the means,
    the counts and every image's values."""
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow([f"{dataset_name}_{name}" for name in metrics])
    writer.writerow([f"{results[name]:.6f}" for name in metrics])
    write_atomically(output_dir / RESULTS_FILENAME, lambda f: f.write(table.getvalue().encode()))
    text = json.dumps({"dataset": dataset_name, **results}, indent=2, default=float)
    write_atomically(output_dir / METRICS_FILENAME, lambda f: f.write(text.encode()))
