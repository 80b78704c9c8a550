"""Backbone features of large images from windows plus a low-resolution view of the whole (official names)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..util.misc import NestedTensor


def window_sizes(total: int, n_windows: int, patch_size: int) -> list[int]:
    """Sizes of `n_windows` windows tiling `total` pixels: a multiple of the patch size near total / n each, the last
    one taking the rest."""
    size = math.ceil((total // n_windows) / patch_size) * patch_size
    sizes = [size] * (n_windows - 1) + [total - size * (n_windows - 1)]
    if sizes[-1] < patch_size:
        raise ValueError(f"a side of {total} px is too small for {n_windows} windows of whole {patch_size}-px patches "
                         f"(the last window would be {sizes[-1]} px)")
    return sizes


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, antialiased resize (torchvision's `resize` on tensors), computed in float32 (CPUs have no
    half-precision antialiased kernel)."""
    out = F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out.to(x.dtype)


class WindowsWrapper(nn.Module):
    """Runs `backbone` on `n_windows_h x n_windows_w` windows of the padded batch and on the whole batch resized to
    one window's size; the window features, put back side by side, and the whole-image features, resized to the
    same grid, are concatenated on channels: twice the backbone's channels at the full image's resolution.

    The ViT sees window-sized inputs only, so a 7B backbone runs on large images with the memory of small ones,
    while the low-resolution view gives every position the context outside its window. Key prefix ``_backbone``.
    """

    def __init__(self, backbone: nn.Module, n_windows_w: int, n_windows_h: int, patch_size: int):
        super().__init__()
        self._backbone = backbone
        self._n_windows_w = n_windows_w
        self._n_windows_h = n_windows_h
        self._patch_size = patch_size
        self.strides = backbone.strides
        self.num_channels = [2 * c for c in backbone.num_channels]  # whole-image view + windows

    def forward(self, tensor_list: NestedTensor) -> list[NestedTensor]:
        images, mask = tensor_list.tensors, tensor_list.mask
        heights = window_sizes(images.shape[-2], self._n_windows_h, self._patch_size)
        widths = window_sizes(images.shape[-1], self._n_windows_w, self._patch_size)
        rows, top = [], 0
        for h in heights:
            row, left = [], 0
            for w in widths:
                window = NestedTensor(images[..., top:top + h, left:left + w], mask[:, top:top + h, left:left + w])
                row.append(self._backbone(window)[0].tensors)
                left += w
            rows.append(torch.cat(row, dim=-1))
            top += h
        windows = torch.cat(rows, dim=-2)
        # The whole view; its mask is not used.
        whole = self._backbone(NestedTensor(_resize(images, (heights[0], widths[0])), mask))[0].tensors
        whole = _resize(whole, windows.shape[-2:])
        features = torch.cat([whole, windows], dim=1)
        feature_mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return [NestedTensor(features, feature_mask)]
