import math

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class RopePositionEmbedding(nn.Module):
    """2-D axial rotary embedding of the patch grid, as in DINOv3.

    Patch centres are normalised to [-1, 1] (per axis, or by the max/min side); each head dimension quarter
    rotates with one of `D_head // 4` periods along y and x. The shift / jitter / rescale coordinate
    augmentations only act in training mode.
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: str = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        if embed_dim % (4 * num_heads):
            raise ValueError(f"embed_dim {embed_dim} must be a multiple of 4 * num_heads ({4 * num_heads}) for RoPE")
        both = min_period is not None and max_period is not None
        if (base is None) == (not both):
            raise ValueError("RoPE needs either `base` or both `min_period` and `max_period`, not both")
        if normalize_coords not in ("min", "max", "separate"):
            raise ValueError(f"normalize_coords must be 'min', 'max' or 'separate', got {normalize_coords!r}")
        self.base = base
        self.min_period = min_period
        self.max_period = max_period
        self.d_head = embed_dim // num_heads
        self.normalize_coords = normalize_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords
        self.dtype = dtype or torch.float32
        # Persistent: official checkpoints carry it, and we load it rather than recompute it.
        self.register_buffer("periods", torch.empty(self.d_head // 4, device=device, dtype=self.dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.periods.device.type == "meta":
            return
        n = self.d_head // 4
        if self.base is not None:
            exps = 2 * torch.arange(n, dtype=self.dtype, device=self.periods.device) / (self.d_head // 2)
            periods = self.base**exps
        else:
            ratio = self.max_period / self.min_period
            exps = torch.linspace(0, 1, n, dtype=self.dtype, device=self.periods.device)
            periods = ratio**exps / ratio * self.max_period
        self.periods.data.copy_(periods)

    def _coords(self, h: int, w: int) -> torch.Tensor:
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "max":
            denom_h = denom_w = max(h, w)
        elif self.normalize_coords == "min":
            denom_h = denom_w = min(h, w)
        else:
            denom_h, denom_w = h, w
        ch = torch.arange(0.5, h, **dd) / denom_h
        cw = torch.arange(0.5, w, **dd) / denom_w
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1)
        return 2.0 * coords - 1.0  # [HW, 2] in [-1, 1]

    def forward(self, *, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        coords = self._coords(H, W)
        dd = {"device": coords.device, "dtype": coords.dtype}
        if self.training:
            if self.shift_coords is not None:
                coords = coords + torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)[None]
            if self.jitter_coords is not None:
                lim = math.log(self.jitter_coords)
                coords = coords * torch.empty(2, **dd).uniform_(-lim, lim).exp()[None]
            if self.rescale_coords is not None:
                lim = math.log(self.rescale_coords)
                coords = coords * torch.empty(1, **dd).uniform_(-lim, lim).exp()
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [HW, 2, D/4]
        angles = angles.flatten(1, 2).tile(2)  # [HW, D]
        return torch.sin(angles), torch.cos(angles)


def rope_rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_apply(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    return x * cos + rope_rotate_half(x) * sin
