"""Fixed 2D sine/cosine position encoding (DETR / Mask2Former convention)."""

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Sine encoding of (y, x) pixel positions: ``[B, 2 * num_pos_feats, H, W]``, y features first.

    Channel ``2i`` of each half is ``sin(pos / T^(2i / F))`` and channel ``2i + 1`` is ``cos`` of the same
    argument. With ``normalize`` the positions (1-based, counting only non-padded pixels) are rescaled so
    that the last valid pixel sits at ``scale``.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000,
        normalize: bool = False,
        scale: float | None = None,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``[B, C, H, W]`` (only its shape and device are used); ``mask``: ``[B, H, W]``, True = padding."""
        B, _, H, W = x.shape
        if mask is None:
            mask = torch.zeros((B, H, W), dtype=torch.bool, device=x.device)
        valid = (~mask).to(torch.float32)
        y = valid.cumsum(1)
        x_pos = valid.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y = y / (y[:, -1:, :] + eps) * self.scale
            x_pos = x_pos / (x_pos[:, :, -1:] + eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)

        def encode(p):
            p = p[..., None] / dim_t
            return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

        return torch.cat((encode(y), encode(x_pos)), dim=-1).permute(0, 3, 1, 2)
