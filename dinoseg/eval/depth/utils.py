"""Depth evaluation numerics: least-squares alignment (and, at their official path, the CHMv2 mixed-log bins)."""

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from .models.bins import CHMV2_DEPTH_SCALE, create_chmv2_mixlog_bins, create_outputs_with_chmv2_mixlog_norm

logger = logging.getLogger("dinoseg")

__all__ = ["CHMV2_DEPTH_SCALE", "align_depth_least_square", "create_chmv2_mixlog_bins", "create_outputs_with_chmv2_mixlog_norm"]

def _downscale(arr: np.ndarray, factor: float) -> np.ndarray:
    size = [max(1, math.floor(s * factor)) for s in arr.shape[-2:]]
    out = F.interpolate(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))[None, None], size=size, mode="nearest")
    return out[0, 0].numpy()


def align_depth_least_square(
    gt_arr: np.ndarray | torch.Tensor,
    pred_arr: np.ndarray | torch.Tensor,
    valid_mask_arr: np.ndarray | torch.Tensor,
    max_resolution: int | None = None,
):
    """Scale and shift of `pred_arr` that best fit `gt_arr` on the valid pixels (float64 least squares, as in
    Marigold's evaluation). Returns ``(aligned prediction, scale, shift)``; the prediction keeps its type,
    shape, dtype and device.

    The three arrays must hold one image (``squeeze()`` gives ``[H, W]``). `max_resolution` fits on a
    nearest-neighbour downscaled copy whose longer side is at most that many pixels. With fewer than two
    valid pixels there is nothing to fit: scale 1 and shift 0 (with a warning in the log).
    """
    is_tensor = isinstance(pred_arr, torch.Tensor)
    if is_tensor:
        if not (isinstance(gt_arr, torch.Tensor) and isinstance(valid_mask_arr, torch.Tensor)):
            raise TypeError("align_depth_least_square: pass gt, prediction and mask all as tensors or all as arrays")
        device, dtype = pred_arr.device, pred_arr.dtype
        pred_np = pred_arr.detach().float().cpu().numpy()
        gt = gt_arr.detach().float().cpu().numpy()
        mask = valid_mask_arr.detach().cpu().numpy()
    else:
        pred_np, gt, mask = np.asarray(pred_arr), np.asarray(gt_arr), np.asarray(valid_mask_arr)
    gt, pred, mask = gt.squeeze(), pred_np.squeeze(), mask.squeeze().astype(bool)
    if not gt.shape == pred.shape == mask.shape:
        raise ValueError(f"align_depth_least_square: shapes differ: gt {gt.shape}, pred {pred.shape}, mask {mask.shape}")
    if max_resolution is not None:
        factor = min(max_resolution / s for s in gt.shape[-2:])
        if factor < 1:
            gt, pred, mask = _downscale(gt, factor), _downscale(pred, factor), _downscale(mask, factor) > 0.5
    x = pred[mask].astype(np.float64)
    y = gt[mask].astype(np.float64)
    if x.size < 2:
        logger.warning("align_depth_least_square: %d valid pixel(s), nothing to fit: prediction left unchanged", x.size)
        scale, shift = 1.0, 0.0
    else:
        design = np.stack([x, np.ones_like(x)], axis=1)
        (scale, shift), *_ = np.linalg.lstsq(design, y, rcond=None)
        scale, shift = float(scale), float(shift)
    aligned = pred_np.astype(np.float64) * scale + shift
    if is_tensor:
        return torch.as_tensor(aligned, dtype=dtype, device=device), scale, shift
    return aligned.astype(pred_np.dtype, copy=False), scale, shift
