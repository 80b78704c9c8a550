"""Segmentation training loss: weighted sum of a softmax multi-class Dice loss and cross-entropy."""

import torch
from torch import nn

from ...layers.deterministic import cross_entropy, resize_bilinear

__all__ = ["MultiSegmentationLoss", "softmax_dice_loss"]


def softmax_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    smooth: float = 1.0,
    exponent: float = 2.0,
) -> torch.Tensor:
    """Softmax Dice loss, mean over images and classes; pixels where `valid` is False count for nothing.

    Per image and class: 1 - (2 sum(p t) + smooth) / (sum(p^e + t^e) + smooth), with p the softmax
    probability and t the one-hot target, both summed over valid pixels only (the official loss keeps ignored
    pixels in the denominator, with their label clamped to the last class).
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    valid = valid.unsqueeze(1).to(probs.dtype)  # [B, 1, H, W]
    # Float one-hot built in place (F.one_hot would materialise an int64 [B, H, W, C] tensor).
    one_hot = torch.zeros_like(probs).scatter_(1, target.clamp(0, num_classes - 1).unsqueeze(1), 1.0) * valid
    probs = probs * valid
    dims = (2, 3)
    numerator = 2 * (probs * one_hot).sum(dims) + smooth
    denominator = probs.pow(exponent).sum(dims) + one_hot.pow(exponent).sum(dims) + smooth
    return (1 - numerator / denominator).mean()


class MultiSegmentationLoss(nn.Module):
    """`diceloss_weight * Dice + celoss_weight * cross-entropy`, both ignoring `ignore_index` pixels.

    - Cross-entropy is averaged over the non-ignored pixels of the batch; a batch where every pixel is
      ignored gives a finite 0 with zero gradients (plain `F.cross_entropy` gives NaN).
    - Either weight may be 0 (that term is then skipped); both 0 (the official defaults) is an error at
      construction (the official loss then fails at its first call). The official class used only one of the
      two losses (Dice alone when its weight is positive).
    - `target` may be [B, H, W] or [B, 1, H, W] (the official training step squeezed every singleton
      dimension, which broke batch size 1). Logits at another resolution than the target are bilinearly
      resized to it first, as the official training step does.
    """

    def __init__(self, diceloss_weight: float = 0.0, celoss_weight: float = 0.0, *, ignore_index: int = 255):
        super().__init__()
        if diceloss_weight < 0 or celoss_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got dice={diceloss_weight}, ce={celoss_weight}")
        if diceloss_weight == 0 and celoss_weight == 0:
            raise ValueError("MultiSegmentationLoss: diceloss_weight and celoss_weight are both 0")
        self.diceloss_weight = float(diceloss_weight)
        self.celoss_weight = float(celoss_weight)
        self.ignore_index = ignore_index

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.ndim != 4:
            raise ValueError(
                f"MultiSegmentationLoss: expected logits [B, C, H, W], got shape {tuple(pred.shape)}"
            )
        if target.ndim == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if target.ndim != 3 or target.shape[0] != pred.shape[0]:
            raise ValueError(
                f"MultiSegmentationLoss: target shape {tuple(target.shape)} does not match logits {tuple(pred.shape)}; "
                "expected [B, H, W] or [B, 1, H, W]"
            )
        if target.is_floating_point():
            raise TypeError(f"MultiSegmentationLoss: target must hold integer labels, got {target.dtype}")
        target = target.long()
        if pred.shape[-2:] != target.shape[-2:]:
            pred = resize_bilinear(pred, target.shape[-2:])
        num_classes = pred.shape[1]
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= num_classes))
        if bad.any():
            raise ValueError(
                f"MultiSegmentationLoss: label value {target[bad][0].item()} is outside [0, {num_classes}) "
                f"and is not ignore_index {self.ignore_index}"
            )
        loss = pred.new_zeros((), dtype=torch.float32)
        if self.celoss_weight:
            ce = cross_entropy(pred.float(), target, ignore_index=self.ignore_index, reduction="sum")
            loss = loss + self.celoss_weight * ce / valid.sum().clamp(min=1)
        if self.diceloss_weight:
            loss = loss + self.diceloss_weight * softmax_dice_loss(pred, target, valid)
        return loss
