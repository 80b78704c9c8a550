"""Stochastic depth (per-sample residual dropping), as the official ConvNeXt uses it: training mode only."""

import torch
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero the residual branch `x` of whole samples with probability `drop_prob` and rescale the kept ones by
    1 / (1 - drop_prob), so that the expected output is `x`; the identity outside training."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample, broadcast over the rest
    kept = torch.rand(shape, device=x.device) < keep_prob  # drawn in float32 whatever the dtype of x
    return x.div(keep_prob) * kept.to(x.dtype)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
