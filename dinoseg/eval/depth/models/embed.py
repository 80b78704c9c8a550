"""Adapting an input image to the backbone's patch size (official `CenterPadding` / `StretchToMultiple`)."""

import torch
import torch.nn.functional as F
from torch import nn


def _round_up(size: int, multiple: int) -> int:
    # Integer arithmetic only (no float division), so that an exported graph computes it from a symbolic size.
    return (size + multiple - 1) // multiple * multiple


class CenterPadding(nn.Module):
    """Zero-pads the last two dimensions up to a multiple of `multiple`, splitting the padding evenly (the
    extra pixel of an odd padding goes to the bottom / right). The padding is not cropped back later."""

    def __init__(self, multiple: int):
        super().__init__()
        self.multiple = multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
            extra = _round_up(size, self.multiple) - size
            pads += [extra // 2, extra - extra // 2]
        return F.pad(x, pads)

    def extra_repr(self) -> str:
        return f"multiple={self.multiple}"


class StretchToMultiple(nn.Module):
    """Resizes the last two dimensions (bilinear) up to the next multiple of `multiple`."""

    def __init__(self, multiple: int):
        super().__init__()
        self.multiple = multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, h, w = x.shape
        size = (_round_up(h, self.multiple), _round_up(w, self.multiple))
        if not torch.compiler.is_exporting() and size == (h, w):  # traced: always resized (identity at scale 1)
            return x
        out = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=size, mode="bilinear")
        return out.reshape(*lead, *size)

    def extra_repr(self) -> str:
        return f"multiple={self.multiple}"


class DropRemainder(nn.Module):
    """Crops the last two dimensions down to a multiple of `multiple` (bottom / right rows and columns go):
    what a patch embedding with stride `multiple` does to them anyway."""

    def __init__(self, multiple: int):
        super().__init__()
        self.multiple = multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return x[..., : h - h % self.multiple, : w - w % self.multiple]

    def extra_repr(self) -> str:
        return f"multiple={self.multiple}"
