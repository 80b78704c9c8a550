"""Padded image batches (`NestedTensor`: images and the mask of their padding) and small helpers, official names."""

import copy

import torch
import torch.nn.functional as F
from torch import nn


class NestedTensor:
    """A batch of images padded to a common size (`tensors`, B x C x H x W) with `mask` (B x H x W), True on padding."""

    def __init__(self, tensors: torch.Tensor, mask: torch.Tensor | None):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> "NestedTensor":
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def decompose(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.tensors, self.mask

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={None if self.mask is None else tuple(self.mask.shape)})"


def nested_tensor_from_tensor_list(tensor_list: list[torch.Tensor]) -> NestedTensor:
    """Pad (C, H, W) images of any sizes with zeros at the bottom and right to the largest H and W of the list
    (a (B, C, H, W) tensor counts as a list of B images, as in the official code)."""
    if len(tensor_list) == 0 or any(t.ndim != 3 for t in tensor_list):
        raise ValueError("nested_tensor_from_tensor_list takes a non-empty list of (C, H, W) tensors")
    channels = max(t.shape[0] for t in tensor_list)
    height = max(t.shape[1] for t in tensor_list)
    width = max(t.shape[2] for t in tensor_list)
    first = tensor_list[0]
    tensors = first.new_zeros((len(tensor_list), channels, height, width))
    mask = torch.ones((len(tensor_list), height, width), dtype=torch.bool, device=first.device)
    for image, padded, m in zip(tensor_list, tensors, mask):
        c, h, w = image.shape
        padded[:c, :h, :w].copy_(image)
        m[:h, :w] = False
    return NestedTensor(tensors, mask)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x), with x clamped to [0, 1] and both x and 1 - x to at least `eps`."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def collate_fn(batch):
    """(image, target) samples -> (NestedTensor of the images, tuple of targets)."""
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images)), targets


def _get_clones(module: nn.Module, N: int) -> nn.ModuleList:
    """`N` independent deep copies of `module` (decoder layers, per-layer prediction heads)."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(N)])


def _get_activation_fn(activation: str):
    """The activation function named `activation`: relu, gelu or glu."""
    functions = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if activation not in functions:
        raise ValueError(f"activation should be one of {sorted(functions)}, not {activation!r}")
    return functions[activation]
