"""Low-rank adapters (LoRA) on a linear layer that keeps its official state-dict keys.

`LoRALinear(base, rank, alpha)` takes over the tensors of `base` (an `nn.Linear` or the qkv `LinearKMaskedBias`)
under their own names (`weight`, `bias`, `bias_mask`), so an official checkpoint still fits it, and adds
`lora_A` [rank, in] and `lora_B` [out, rank]: y = base(x) + (alpha / rank) * B A x. B starts at zero, so an
adapted layer computes exactly what `base` computes until B is trained. The adapters are float32 whatever the
dtype of the base weights (under autocast the products run in the autocast dtype, the gradients and optimizer
states stay float32).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_class = type(base)  # what `merged()` gives back
        self.weight = base.weight
        self.bias = base.bias
        for name, buffer in base.named_buffers(recurse=False):  # LinearKMaskedBias: `bias_mask`
            self.register_buffer(name, buffer, persistent=name not in base._non_persistent_buffers_set)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        device = base.weight.device
        # A as nn.Linear initialises a weight (kaiming uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), drawn on the
        # CPU from `generator` so the adapters do not depend on the device or on the global RNG stream.
        bound = 1 / math.sqrt(self.in_features)
        a = (torch.rand(rank, self.in_features, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32, device=device))

    def base_bias(self) -> torch.Tensor | None:
        if self.bias is None or not hasattr(self, "bias_mask"):
            return self.bias
        return self.bias * self.bias_mask.to(self.bias.dtype)  # as LinearKMaskedBias computes it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.base_bias())
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)  # float32 adapters on half inputs, outside autocast
        delta = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return out + (delta * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) B A, in float32: what merging adds to `weight`."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain `base_class` layer with the adapters folded into its weight (same keys as the original layer)."""
        layer = self.base_class(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        weight = (self.weight.float() + self.delta_weight().to(self.weight.device)).to(self.weight.dtype)
        state = {"weight": weight}
        state.update({k: v for k, v in self.state_dict().items() if k not in ("weight", "lora_A", "lora_B")})
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.requires_grad_(self.weight.requires_grad)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"
