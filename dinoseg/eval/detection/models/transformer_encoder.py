"""The DETR transformer encoder over the flattened feature map (official names and keys): self-attention with
the position embedding added to queries and keys, then a feed-forward block; post-norm unless `normalize_before`."""

import torch
from torch import nn

from ..util.misc import _get_activation_fn, _get_clones


class TransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        """`src` (B, N, C), `src_key_padding_mask` (B, N) True on padding, `pos` (B, N, C)."""
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return self.norm(output) if self.norm is not None else output


class TransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        # No dropout on the attention weights (official: as fast at evaluation, no loss in accuracy).
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _get_activation_fn(activation)
        self.normalize_before = normalize_before

    @staticmethod
    def with_pos_embed(tensor: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        return tensor if pos is None else tensor + pos

    def _attend(self, x, pos, src_mask, src_key_padding_mask):
        q = k = self.with_pos_embed(x, pos)
        return self.self_attn(q, k, value=x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                              need_weights=False)[0]

    def _feed_forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward_post(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        src = self.norm1(src + self.dropout1(self._attend(src, pos, src_mask, src_key_padding_mask)))
        return self.norm2(src + self.dropout2(self._feed_forward(src)))

    def forward_pre(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        src = src + self.dropout1(self._attend(self.norm1(src), pos, src_mask, src_key_padding_mask))
        return src + self.dropout2(self._feed_forward(self.norm2(src)))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        if self.normalize_before:
            return self.forward_pre(src, src_mask, src_key_padding_mask, pos)
        return self.forward_post(src, src_mask, src_key_padding_mask, pos)
