"""The detector's backbone: chosen blocks of a frozen DINOv3 ViT, concatenated on channels, and their position
embedding (official names and keys: the ViT under ``backbone.0.backbone.``, or ``backbone.0._backbone.backbone.``
inside windows)."""

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from dinoseg.models.frozen import backbone_trains, freeze_backbone, set_backbone_mode

from ..util.misc import NestedTensor
from .position_encoding import build_position_encoding
from .utils import LayerNorm2D
from .windows import WindowsWrapper

logger = logging.getLogger("dinoseg")


def block_indices(n_blocks: int, layers_to_use: int | list[int]) -> list[int]:
    """The last `layers_to_use` blocks (an int), or the listed block indices, checked against the depth."""
    if isinstance(layers_to_use, int):
        if not 0 < layers_to_use <= n_blocks:
            raise ValueError(f"layers_to_use={layers_to_use}: expected 1 to {n_blocks} last blocks or a list of indices")
        return list(range(n_blocks - layers_to_use, n_blocks))
    indices = [int(i) for i in layers_to_use]
    if not indices or any(not 0 <= i < n_blocks for i in indices):
        raise ValueError(f"layers_to_use={list(layers_to_use)}: block indices must lie in [0, {n_blocks - 1}]")
    return indices


class DINOBackbone(nn.Module):
    """Patch features of the blocks `layers_to_use` (the last n, or a list of indices), each normalised by the
    ViT's final norm (and, with `use_layernorm`, by a trainable LayerNorm of its own), concatenated on channels:
    one feature level at stride `patch_size`, with the padding mask resized to it.

    With `train_backbone` False (what `build_backbone` passes, as the official code does) the ViT is frozen and
    marked: it stays in eval mode, runs without autograd and is left out of head checkpoints; an adapted ViT
    (`model.finetune`, `dinoseg.models.finetune`) runs with autograd, the blocks that train in training mode, and
    its adapted tensors are saved with the head. `train_backbone`
    True leaves trainable the parameters of the blocks named in `blocks_to_train` (all of them when None), the
    mask token excepted, as the official rule does.
    """

    def __init__(self, backbone_model: nn.Module, train_backbone: bool, blocks_to_train: list[str] | None = None,
                 layers_to_use: int | list[int] = 1, use_layernorm: bool = True):
        super().__init__()
        self.backbone = backbone_model
        self.blocks_to_train = blocks_to_train
        self.patch_size = backbone_model.patch_size
        self.use_layernorm = use_layernorm
        self.train_backbone = train_backbone
        if train_backbone:
            for name, parameter in backbone_model.named_parameters():
                chosen = blocks_to_train is None or any(f".{b}." in name for b in blocks_to_train)
                parameter.requires_grad_(chosen and "mask_token" not in name)
        else:
            freeze_backbone(backbone_model)
        self.strides = [backbone_model.patch_size]
        n_blocks = backbone_model.n_blocks
        indices = block_indices(n_blocks, layers_to_use)
        dims = getattr(backbone_model, "embed_dims", None) or [backbone_model.embed_dim] * n_blocks
        dims = [dims[i] for i in indices]
        if use_layernorm:
            self.layer_norms = nn.ModuleList([LayerNorm2D(d) for d in dims])
        self.num_channels = [sum(dims)]
        self.layers_to_use = layers_to_use

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_backbone:
            # Frozen: in eval mode (RoPE coordinate augmentation is pre-training only), but for adapted blocks.
            set_backbone_mode(self.backbone, mode)
        return self

    def forward(self, tensor_list: NestedTensor) -> list[NestedTensor]:
        frozen = not self.train_backbone and not backbone_trains(self.backbone)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            xs = self.backbone.get_intermediate_layers(tensor_list.tensors, n=self.layers_to_use, reshape=True)
        if self.use_layernorm:
            xs = [ln(x).contiguous() for ln, x in zip(self.layer_norms, xs)]
        x = torch.cat(list(xs), dim=1)
        mask = F.interpolate(tensor_list.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
        return [NestedTensor(x, mask)]


class BackboneWithPositionEncoding(nn.Sequential):
    """``[0]``: the backbone (features), ``[1]``: one position embedding per feature level; returns both."""

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor) -> tuple[list[NestedTensor], list[torch.Tensor]]:
        features = list(self[0](tensor_list))
        pos = [self[1][i](x).to(x.tensors.dtype) for i, x in enumerate(features)]
        return features, pos


def build_backbone(backbone_model: nn.Module, args) -> BackboneWithPositionEncoding:
    """The frozen backbone of `args` (`layers_to_use`, `blocks_to_train`, `backbone_use_layernorm`,
    `n_windows_sqrt`: n x n windows when above 0) with its position embedding."""
    backbone = DINOBackbone(backbone_model, False, args.blocks_to_train, args.layers_to_use, args.backbone_use_layernorm)
    if args.n_windows_sqrt > 0:
        logger.info("Wrapping the backbone in %d x %d windows", args.n_windows_sqrt, args.n_windows_sqrt)
        backbone = WindowsWrapper(backbone, n_windows_w=args.n_windows_sqrt, n_windows_h=args.n_windows_sqrt,
                                  patch_size=backbone.patch_size)
    return BackboneWithPositionEncoding(backbone, build_position_encoding(args))
