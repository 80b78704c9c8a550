"""Box conversions, overlaps and the reparameterised box deltas of Plain-DETR (official names).

Boxes are (..., 4) tensors: `cxcywh` = centre, width, height; `xyxy` = corners. With `reparam` the detector works in
absolute pixels and regresses deltas relative to reference boxes (`bbox2delta` / `delta2bbox`).
"""

import math

import torch

__all__ = ["bbox2delta", "box_cxcywh_to_xyxy", "box_iou", "box_xyxy_to_cxcywh", "delta2bbox", "generalized_box_iou"]


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU [N, M] of every box of `boxes1` [N, 4] with every box of `boxes2` [M, 4] (xyxy): torchvision's."""
    from torchvision.ops import box_iou as iou  # imported when first used: its import pulls in torch._dynamo

    return iou(boxes1, boxes2)


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Generalised IoU [N, M] of every box of `boxes1` [N, 4] with every box of `boxes2` [M, 4] (xyxy): torchvision's."""
    from torchvision.ops import generalized_box_iou as giou

    return giou(boxes1, boxes2)


def box_cxcywh_to_xyxy(x: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def delta2bbox(proposals: torch.Tensor, deltas: torch.Tensor, max_shape=None, wh_ratio_clip: float = 16 / 1000,
               clip_border: bool = True, add_ctr_clamp: bool = False, ctr_clamp: float = 32) -> torch.Tensor:
    """XYXY boxes from `deltas` (dx, dy, dw, dh) applied to `proposals` (cxcywh, pixels): the centre moves by
    (dx, dy) x the proposal's size, the size scales by exp(dw, dh), with |dw|, |dh| clipped at |log(wh_ratio_clip)|.
    `max_shape` (H, W) clips the corners to the image when `clip_border`: numbers, or tensors that broadcast against
    (..., 2) (the detector's per-image valid sizes, (B, 1, 1) each)."""
    max_ratio = abs(math.log(wh_ratio_clip))
    shift = proposals[..., 2:] * deltas[..., :2]
    log_scale = deltas[..., 2:]
    if add_ctr_clamp:
        shift = shift.clamp(min=-ctr_clamp, max=ctr_clamp)
        log_scale = log_scale.clamp(max=max_ratio)
    else:
        log_scale = log_scale.clamp(min=-max_ratio, max=max_ratio)
    centre = proposals[..., :2] + shift
    size = proposals[..., 2:] * log_scale.exp()
    boxes = torch.cat([centre - 0.5 * size, centre + 0.5 * size], dim=-1)
    if clip_border and max_shape is not None:
        # Numbers, or tensors broadcasting against (..., 2): the detector passes (B, 1, 1) valid sizes per image.
        height, width = max_shape
        xs = boxes[..., 0::2].clamp(min=0).clamp(max=width)
        ys = boxes[..., 1::2].clamp(min=0).clamp(max=height)
        boxes = torch.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], dim=-1)
    return boxes


def bbox2delta(proposals: torch.Tensor, gt: torch.Tensor, means=(0.0, 0.0, 0.0, 0.0),
               stds=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """The deltas that move `proposals` onto `gt` (both cxcywh, pixels), in float32; sizes get 0.1 added so that
    empty proposals stay finite. Proposals and targets of different shapes, (N, 4) and (M, 4), give every pair:
    (N, M, 4) (the matcher's cost)."""
    if proposals.shape != gt.shape:
        proposals, gt = proposals[:, None], gt[None]
    proposals, gt = proposals.float(), gt.float()
    px, py, pw, ph = proposals.unbind(-1)
    gx, gy, gw, gh = gt.unbind(-1)
    pw, ph = pw + 0.1, ph + 0.1
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    if tuple(means) != (0.0, 0.0, 0.0, 0.0) or tuple(stds) != (1.0, 1.0, 1.0, 1.0):
        deltas = (deltas - deltas.new_tensor(means)) / deltas.new_tensor(stds)
    return deltas
