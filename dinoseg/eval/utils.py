"""Frozen (or adapted) backbone feature extraction shared by every evaluation task."""

import contextlib
from enum import Enum

import torch
from torch import nn

from ..models.frozen import backbone_grad_mode, freeze_backbone, set_backbone_mode


def parse_enum(enum_cls: type[Enum], value, key: str):
    """The member of `enum_cls` that `value` is or spells: itself, its name (``"SINE"``) or its value (``"sine"``),
    case-insensitive; a ValueError naming `key` and the choices otherwise (official configs spell either)."""
    if isinstance(value, enum_cls):
        return value
    text = str(value).strip()
    for member in enum_cls:
        if text.upper() == member.name or text.lower() == str(member.value).lower():
            return member
    raise ValueError(f"unknown {key} {value!r}; expected one of {[m.name for m in enum_cls]}")


class BackboneLayersSet(Enum):
    LAST = "LAST"
    FOUR_LAST = "FOUR_LAST"
    FOUR_EVEN_INTERVALS = "FOUR_EVEN_INTERVALS"


def get_backbone_out_indices(n_blocks: int, layers: BackboneLayersSet | str) -> list[int]:
    """Block indices for a layer set, with the official rule (depth 24 -> [4, 11, 17, 23])."""
    layers = BackboneLayersSet(layers) if isinstance(layers, str) else layers
    if layers == BackboneLayersSet.LAST:
        return [n_blocks - 1]
    if n_blocks < 4:
        raise ValueError(f"{layers.value} needs a backbone with at least 4 blocks, this one has {n_blocks}")
    if layers == BackboneLayersSet.FOUR_LAST:
        return list(range(n_blocks - 4, n_blocks))
    if n_blocks == 24:  # the official ViT-L choice, kept for checkpoint compatibility
        return [4, 11, 17, 23]
    return [i * (n_blocks // 4) - 1 for i in range(1, 5)]


class ModelWithIntermediateLayers(nn.Module):
    """Runs a frozen backbone and returns the outputs of the chosen blocks.

    `n` is a number of last blocks or a list of block indices (as `get_intermediate_layers`); `reshape` and
    `return_class_token` as there (official defaults: token sequences, with the class token). The backbone
    is frozen and kept in eval mode, and its forward runs under `no_grad` so no autograd graph is built for
    it; unlike `inference_mode`, the outputs are ordinary tensors that a trainable head can consume. An adapted
    backbone (`dinoseg.models.finetune`) runs with gradients, its trained blocks in training mode with the model.
    """

    def __init__(
        self,
        feature_model: nn.Module,
        n: int | list[int],
        autocast_ctx=contextlib.nullcontext,
        reshape: bool = False,
        return_class_token: bool = True,
    ):
        super().__init__()
        self.feature_model = freeze_backbone(feature_model)
        self.n = n
        self.autocast_ctx = autocast_ctx
        self.reshape = reshape
        self.return_class_token = return_class_token

    @property
    def embed_dim(self) -> int:
        return self.feature_model.embed_dim

    @property
    def patch_size(self) -> int:
        return self.feature_model.patch_size

    def train(self, mode: bool = True):
        super().train(mode)
        # Eval mode but for the blocks an adaptation trains (RoPE coordinate augmentation is pre-training only).
        set_backbone_mode(self.feature_model, mode)
        return self

    def forward(self, images: torch.Tensor):
        with backbone_grad_mode(self.feature_model), self.autocast_ctx():
            return self.feature_model.get_intermediate_layers(
                images, n=self.n, reshape=self.reshape, return_class_token=self.return_class_token
            )


def autocast_context(device_type: str, dtype: torch.dtype | None):
    """Mixed precision on `device_type` with `dtype`; no autocast at all for float32 (or None), on any device."""
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)
