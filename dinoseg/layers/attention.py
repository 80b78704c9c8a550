import torch
import torch.nn.functional as F
from torch import nn

from .rope_position_encoding import rope_apply


class LinearKMaskedBias(nn.Linear):
    """qkv projection whose key bias is multiplied by a stored mask (1 for q and v, 0 for k).

    The mask is a persistent buffer in the official checkpoints; it is loaded, never recomputed, so a
    checkpoint that was trained with another mask still reproduces its features.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        if out_features % 3:
            raise ValueError(f"qkv out_features must be a multiple of 3, got {out_features}")
        if self.bias is not None:
            mask = torch.ones(out_features, device=device)
            if mask.device.type != "meta":
                d = out_features // 3
                mask[d : 2 * d] = 0
            self.register_buffer("bias_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias * self.bias_mask.to(self.bias.dtype)
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        mask_k_bias: bool = False,
        device=None,
    ):
        super().__init__()
        self.num_heads = num_heads
        linear = LinearKMaskedBias if mask_k_bias else nn.Linear
        self.qkv = linear(dim, dim * 3, bias=qkv_bias, device=device)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)

    @staticmethod
    def _apply_rope(t: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        # RoPE acts on patch tokens only: class and storage tokens (the prefix) pass through unchanged.
        prefix = t.shape[-2] - sin.shape[-2]
        dtype = t.dtype
        rotated = rope_apply(t[:, :, prefix:].to(sin.dtype), sin, cos).to(dtype)
        return torch.cat([t[:, :, :prefix], rotated], dim=-2)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            sin, cos = rope
            q, k = self._apply_rope(q, sin, cos), self._apply_rope(k, sin, cos)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))
