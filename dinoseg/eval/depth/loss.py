"""Depth training losses (official `dinov3.eval.depth.loss`): scale-invariant log loss, gradient matching losses,
L1, and their weighted sum.

Every loss is called as ``loss(pred, target, valid_mask=None)`` on [B, 1, H, W] tensors. Without a
`valid_mask`, pixels whose target is 0 or less (missing depth) are left out; ``keep_all_without_mask=True``
keeps them, as the official code does.
"""

from enum import Enum
from functools import partial

import torch
from torch import nn


def _default_mask(target: torch.Tensor, valid_mask: torch.Tensor | None, keep_all: bool) -> torch.Tensor:
    if valid_mask is not None:
        return valid_mask.bool()
    return torch.ones_like(target, dtype=torch.bool) if keep_all else target > 0


class LossType(Enum):
    SIGLOSS = "sigloss"
    GRADIENT_LOSS = "gradient_loss"
    GRADIENT_LOG_LOSS = "gradient_log_loss"
    L1 = "l1"

    def module(self, *args, **kwargs) -> nn.Module:
        """The loss module; `SIGLOSS` defaults to a warm-up of 100 calls, as the official code."""
        factories = {
            LossType.SIGLOSS: partial(SigLoss, warm_up=True, warm_iter=100),
            LossType.GRADIENT_LOSS: GradientLoss,
            LossType.GRADIENT_LOG_LOSS: GradientLogLoss,
            LossType.L1: L1Loss,
        }
        return factories[self](*args, **kwargs)


class _MultiScaleGradientLoss(nn.Module):
    """Mean absolute difference of the masked error ``transform(pred) - transform(target)`` between pixels two
    apart (vertically and horizontally, both valid), summed over four subsamplings (strides 1, 2, 4, 6).
    A scale without valid pixels adds 0."""

    def __init__(self, *, keep_all_without_mask: bool = False):
        super().__init__()
        self.eps = 0.001
        self.keep_all_without_mask = keep_all_without_mask

    def _error(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _default_mask(target, valid_mask, self.keep_all_without_mask)
        total = input.new_zeros(())
        for stride in (1, 2, 4, 6):
            p, t, m = (a[..., ::stride, ::stride] for a in (input, target, mask))
            diff = self._error(p, t) * m
            v_mask = m[..., :-2, :] & m[..., 2:, :]
            h_mask = m[..., :, :-2] & m[..., :, 2:]
            v_grad = (diff[..., :-2, :] - diff[..., 2:, :]).abs() * v_mask
            h_grad = (diff[..., :, :-2] - diff[..., :, 2:]).abs() * h_mask
            total = total + (h_grad.sum() + v_grad.sum()) / m.sum().clamp_min(1)
        return total


class GradientLoss(_MultiScaleGradientLoss):
    """Gradient matching of the depth error."""

    def _error(self, pred, target):
        return pred - target


class GradientLogLoss(_MultiScaleGradientLoss):
    """Gradient matching of the log-depth error (MegaDepth)."""

    def _error(self, pred, target):
        return torch.log(pred + self.eps) - torch.log(target + self.eps)


class L1Loss(nn.Module):
    """Mean absolute error over the valid pixels."""

    def __init__(self, *, keep_all_without_mask: bool = False):
        super().__init__()
        self.keep_all_without_mask = keep_all_without_mask

    def forward(self, input: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _default_mask(target, valid_mask, self.keep_all_without_mask)
        loss = nn.functional.l1_loss(input, target, reduction="none") * mask
        return loss.sum() / (mask.sum() + 1e-7)


class SigLoss(nn.Module):
    """Scale-invariant log loss (Eigen et al., as in AdaBins / BinsFormer): with g = log(pred + eps) -
    log(target + eps) on the valid pixels, ``sqrt(var(g) + 0.15 * mean(g)^2)``.

    With `warm_up`, the first `warm_iter` calls (counted per instance) use only ``0.15 * mean(g)^2``. No valid
    pixel gives 0 (not NaN), and so does the variance of a single pixel.
    """

    def __init__(self, warm_up: bool = True, warm_iter: int = 100, *, keep_all_without_mask: bool = False):
        super().__init__()
        self.loss_name = "SigLoss"
        self.eps = 0.001
        self.warm_up = warm_up
        self.warm_iter = warm_iter
        self.warm_up_counter = 0
        self.keep_all_without_mask = keep_all_without_mask

    def sigloss(self, input: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _default_mask(target, valid_mask, self.keep_all_without_mask)
        g = torch.log(input[mask] + self.eps) - torch.log(target[mask] + self.eps)
        warming = self.warm_up and self.warm_up_counter < self.warm_iter
        if warming:
            self.warm_up_counter += 1
        if g.numel() == 0:
            return input.sum() * 0.0  # keeps the graph, so backward() still works
        dg = 0.15 * g.mean() ** 2
        if not warming and g.numel() > 1:
            dg = dg + torch.var(g)
        return dg.abs() if dg <= 0 else torch.sqrt(dg)

    def forward(self, depth_pred: torch.Tensor, depth_gt: torch.Tensor, valid_mask: torch.Tensor | None = None):
        return self.sigloss(depth_pred, depth_gt, valid_mask)


class MultiLoss(nn.Module):
    """Weighted sum of losses given as ``{LossType: weight}`` (MegaDepth-style combinations)."""

    def __init__(self, dict_losses: dict[LossType, float], *, keep_all_without_mask: bool = False):
        super().__init__()
        dict_losses = {LossType[k.upper()] if isinstance(k, str) else k: float(w) for k, w in dict(dict_losses).items()}
        if not dict_losses:
            raise ValueError("MultiLoss: no loss given")
        self.dict_losses = nn.ModuleDict(
            {t.name: t.module(keep_all_without_mask=keep_all_without_mask) for t in dict_losses}
        )
        self.dict_weights = {t.name: w for t, w in dict_losses.items()}
        self.eps = 0.001

    def forward(self, depth_pred: torch.Tensor, depth_gt: torch.Tensor, valid_mask: torch.Tensor | None = None):
        total = 0.0
        for name, loss in self.dict_losses.items():
            total = total + self.dict_weights[name] * loss(depth_pred, depth_gt, valid_mask)
        return total
