import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import SelfAttention
from .ffn_layers import make_ffn
from .layer_scale import LayerScale


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    `drop_path` is the official stochastic depth (`sample_drop_ratio`): in training mode each residual branch runs
    on a random subset of `max(int(B * (1 - drop_path)), 1)` samples of the batch and is added back scaled by
    B / subset, the others pass through; in eval mode it does nothing. `gradient_checkpointing` (set by
    `dinoseg.models.finetune` on the blocks that train) recomputes the block's activations in the backward pass
    instead of storing them.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: str = "mlp",
        norm_layer=nn.LayerNorm,
        init_values: float | None = None,
        drop_path: float = 0.0,
        mask_k_bias: bool = False,
        device=None,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim, device=device)
        self.attn = SelfAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, mask_k_bias=mask_k_bias, device=device
        )
        self.ls1 = LayerScale(dim, init_values, device=device) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim, device=device)
        self.mlp = make_ffn(ffn_layer, dim, int(dim * ffn_ratio), bias=ffn_bias, device=device)
        self.ls2 = LayerScale(dim, init_values, device=device) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # Non-reentrant checkpointing restores the RNG state for the recomputation: same drop-path draws.
            return checkpoint(self._forward, x, rope, use_reentrant=False)
        return self._forward(x, rope)

    def _forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        if self.training and self.sample_drop_ratio > 0.0:
            x = self._add_to_subset(x, lambda t: self.ls1(self.attn(self.norm1(t), rope=rope)))
            return self._add_to_subset(x, lambda t: self.ls2(self.mlp(self.norm2(t))))
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def _add_to_subset(self, x: torch.Tensor, branch) -> torch.Tensor:
        # RoPE tables have no batch dimension here, so the subset shares them.
        b = x.shape[0]
        subset = max(int(b * (1 - self.sample_drop_ratio)), 1)
        indices = torch.randperm(b, device=x.device)[:subset]
        residual = branch(x[indices]).to(x.dtype)  # under autocast the branch may come back in half precision
        return torch.index_add(x, 0, indices, residual, alpha=b / subset)
