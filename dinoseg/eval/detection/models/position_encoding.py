"""Positional encodings of the detector's feature map (official names): sine (normalised or not) or learned."""

import math
from enum import Enum

import torch
from torch import nn

from ...utils import parse_enum
from ..util.misc import NestedTensor


class PositionEncoding(Enum):
    LEARNED = "learned"
    SINE = "sine"
    SINE_UNNORM = "sine_unnorm"

    @classmethod
    def parse(cls, value: "PositionEncoding | str") -> "PositionEncoding":
        """A member, its name or its value, case-insensitive."""
        return parse_enum(cls, value, "position_embedding")


class PositionEmbeddingSine(nn.Module):
    """Sine / cosine of the (y, x) position of each unpadded cell, `num_pos_feats` channels each (y first).

    Positions are cell centres counted from 1 over the unpadded cells (so, minus 0.5, from 0.5); with `normalize`
    they are divided by the image's unpadded extent and multiplied by `scale` (2 pi), so that they span (0, 2 pi]
    whatever the size of the image."""

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: float | None = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, tensor_list: NestedTensor) -> torch.Tensor:
        if tensor_list.mask is None:
            raise ValueError("PositionEmbeddingSine needs the padding mask of the batch")
        valid = ~tensor_list.mask
        rows = valid.cumsum(1, dtype=torch.float32)  # 1, 2, ... down each column's unpadded cells
        cols = valid.cumsum(2, dtype=torch.float32)
        y, x = rows - 0.5, cols - 0.5
        if self.normalize:
            eps = 1e-6
            y = y / (rows[:, -1:, :] + eps) * self.scale
            x = x / (cols[:, :, -1:] + eps) * self.scale
        else:
            y, x = y * self.scale, x * self.scale
        index = torch.arange(self.num_pos_feats, dtype=torch.float32, device=valid.device)
        dim_t = self.temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / self.num_pos_feats)
        return torch.cat([_interleave_sin_cos(y[..., None] / dim_t), _interleave_sin_cos(x[..., None] / dim_t)],
                         dim=3).permute(0, 3, 1, 2)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """(..., 2n) angles -> sin of the even ones and cos of the odd ones, interleaved: sin a0, cos a1, sin a2, ..."""
    return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute embeddings: one table for columns, one for rows, `num_pos_feats` channels each (x first);
    at most 50 cells per side (the official table size)."""

    def __init__(self, num_pos_feats: int = 256):
        super().__init__()
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor) -> torch.Tensor:
        x = tensor_list.tensors
        h, w = x.shape[-2:]
        limit = self.row_embed.num_embeddings
        if h > limit or w > limit:
            raise ValueError(f"learned position embedding: a {h} x {w} feature map exceeds its {limit} x {limit} table "
                             f"(use the SINE position embedding for larger images)")
        cols = self.col_embed(torch.arange(w, device=x.device))  # (w, C)
        rows = self.row_embed(torch.arange(h, device=x.device))  # (h, C)
        pos = torch.cat([cols[None].expand(h, -1, -1), rows[:, None].expand(-1, w, -1)], dim=-1)
        return pos.permute(2, 0, 1)[None].expand(x.shape[0], -1, -1, -1)


def build_position_encoding(args) -> nn.ModuleList:
    """One position embedding per feature level (the same module, shared), `hidden_dim // 2` channels per axis."""
    n_steps = args.hidden_dim // 2
    kind = PositionEncoding.parse(args.position_embedding)
    if kind == PositionEncoding.SINE:
        embedding = PositionEmbeddingSine(n_steps, normalize=True)
    elif kind == PositionEncoding.LEARNED:
        embedding = PositionEmbeddingLearned(n_steps)
    else:
        embedding = PositionEmbeddingSine(n_steps, normalize=False)
    return nn.ModuleList([embedding for _ in range(args.num_feature_levels)])
