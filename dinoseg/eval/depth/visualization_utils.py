"""Colour-mapped depth images and the evaluation's saved results (official `visualization_utils`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from .config import ResultConfig, ResultExtension


def unnormalize(tensor: torch.Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """A normalised image [3, H, W] back to [0, 1] (on the CPU)."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] image, got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().float().cpu()
    return (tensor * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)


def normalized_tensor_to_pil(tensor: torch.Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                             std: Sequence[float] = IMAGENET_DEFAULT_STD) -> Image.Image:
    """A normalised image [3, H, W] back to an RGB PIL image."""
    rgb = (unnormalize(tensor, mean, std) * 255 + 0.5).to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def depth_tensor_to_colorized_pil(depth_tensor: torch.Tensor, cmap: str = "plasma", vmin: float | None = None,
                                  vmax: float | None = None) -> Image.Image:
    """Depth [.., H, W] -> RGB image through a matplotlib colour map over [vmin, vmax] (default: the range of the
    valid, i.e. positive and finite, depths). Pixels without depth are black."""
    import matplotlib  # imported when first used: its import is slow and most commands never draw

    value = depth_tensor.detach().float().cpu().reshape(depth_tensor.shape[-2:]).numpy()
    valid = np.isfinite(value) & (value > 0)
    vmin = float(value[valid].min()) if vmin is None and valid.any() else (vmin or 0.0)
    vmax = float(value[valid].max()) if vmax is None and valid.any() else (vmax or 1.0)
    scaled = np.clip((value - vmin) / (vmax - vmin), 0, 1) if vmax > vmin else np.zeros_like(value)
    rgb = matplotlib.colormaps[cmap](np.nan_to_num(scaled), bytes=True)[..., :3]
    rgb[~valid] = 0
    return Image.fromarray(np.ascontiguousarray(rgb))


def save_predictions(
    img: torch.Tensor,  # [1, 3, h, w] normalised
    pred: torch.Tensor,  # [1, 1, H, W] or [1, H, W]
    gt: torch.Tensor,  # [1, 1, H, W]
    result_config: ResultConfig,
    save_dir: str,
    save_index: int,
    pred_tensor_to_pil_fn: Callable[..., Image.Image] = depth_tensor_to_colorized_pil,
) -> None:
    """Writes ``<save_dir>/visualizations/results_<index>.<ext>``: prediction and ground truth side by side,
    colour-mapped over the ground truth's range (so their colours compare); with ``save_separate_files`` also
    ``image_`` / ``pred_`` / ``gt_<index>``; with the ``pth`` extension the raw tensors instead."""
    out_dir = os.path.join(save_dir, "visualizations")
    os.makedirs(out_dir, exist_ok=True)
    index = int(save_index)
    if result_config.extension == ResultExtension.PTH:
        torch.save({"image": unnormalize(img[0]), "pred": pred.detach().cpu(), "target": gt.detach().cpu()},
                   os.path.join(out_dir, f"results_{index}.pth"))
        return
    valid = gt[(gt > 0) & torch.isfinite(gt)]
    vmin, vmax = (float(valid.min()), float(valid.max())) if valid.numel() else (None, None)
    pred_pil = pred_tensor_to_pil_fn(pred.reshape(pred.shape[-2:]), vmin=vmin, vmax=vmax)
    gt_pil = pred_tensor_to_pil_fn(gt.reshape(gt.shape[-2:]), vmin=vmin, vmax=vmax)
    img_pil = normalized_tensor_to_pil(img[0]).resize(gt_pil.size, Image.BILINEAR)
    if result_config.overlay_alpha < 1.0:
        pred_pil = Image.blend(img_pil, pred_pil, result_config.overlay_alpha)
        gt_pil = Image.blend(img_pil, gt_pil, result_config.overlay_alpha)
    if result_config.save_resolution:
        w, h = gt_pil.size
        scale = result_config.save_resolution / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img_pil = img_pil.resize(size, Image.BILINEAR)
        pred_pil, gt_pil = pred_pil.resize(size, Image.NEAREST), gt_pil.resize(size, Image.NEAREST)
    ext = ResultExtension(result_config.extension).value
    if result_config.save_separate_files:
        for name, pil in (("image", img_pil), ("pred", pred_pil), ("gt", gt_pil)):
            pil.save(os.path.join(out_dir, f"{name}_{index}.{ext}"))
    band = np.concatenate([np.asarray(pred_pil), np.asarray(gt_pil)], axis=1)
    Image.fromarray(band).save(os.path.join(out_dir, f"results_{index}.{ext}"))
