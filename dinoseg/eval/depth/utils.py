"""Numerics shared by the depth models and the evaluation: CHMv2 mixed-log bins, least-squares alignment."""

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger("dinoseg")

# The CHMv2 head predicts depth divided by this factor: its bins stop at max_depth / 8 and its output is
# multiplied back by 8.
CHMV2_DEPTH_SCALE = 8.0


def create_chmv2_mixlog_bins(min_depth: float, max_depth: float, n_bins: int, device=None) -> torch.Tensor:
    """Bin centres that move from log spacing (first bin) to linear spacing (last bin) on
    [min_depth, max_depth / 8]."""
    top = max_depth / CHMV2_DEPTH_SCALE
    linear = torch.linspace(min_depth, top, n_bins, device=device)
    log = torch.exp(torch.linspace(torch.log(torch.tensor(min_depth)), torch.log(torch.tensor(top)), n_bins, device=device))
    t = torch.linspace(1.0, 0.0, n_bins, device=device)  # weight of the log spacing
    return t * log + (1.0 - t) * linear


def create_outputs_with_chmv2_mixlog_norm(
    input: torch.Tensor,
    bins: torch.Tensor,
    max_clamp_value: float = 1e-4,
    eps_shift: float = 1e-8,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Depth [N, 1, H, W] in metres from CHMv2 bin logits [N, n_bins, H, W]: ReLU weights made strictly
    positive by a tiny shift, normalised to sum to one, times the bins, times 8."""
    weights = torch.relu(input)
    shift = (-weights.amin(dim=1, keepdim=True)).clamp(0.0, max_clamp_value) + eps_shift
    weights = weights + shift
    total = torch.nan_to_num(weights.sum(dim=1, keepdim=True), nan=1.0, posinf=1.0, neginf=1.0).clamp_min(eps)
    weights = weights / total
    depth = (weights * bins.view(1, -1, 1, 1).clamp_min(eps)).sum(dim=1, keepdim=True).clamp_min(eps)
    return depth * CHMV2_DEPTH_SCALE


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
