"""Builds the ViT-Adapter + Mask2Former pair used by ``build_segmentation_decoder(decoder_type="m2f")`` (on a
ConvNeXt: its stage pyramid + Mask2Former)."""

import inspect
from collections.abc import Sequence

from torch import nn

from .backbone.convnext_pyramid import ConvNeXtPyramid
from .backbone.dinov3_adapter import DINOv3_Adapter
from .heads.mask2former_head import Mask2FormerHead


def build_m2f_modules(
    backbone_model: nn.Module,
    interaction_indexes: Sequence[int],
    hidden_dim: int = 2048,
    num_classes: int = 150,
    *,
    num_queries: int = 100,
    nheads: int = 16,
    dim_feedforward: int = 4096,
    enc_layers: int = 6,
    dec_layers: int = 9,
    pixel_decoder_nheads: int = 16,
    **adapter_options,
) -> tuple[DINOv3_Adapter | ConvNeXtPyramid, Mask2FormerHead]:
    """Returns ``(backbone_side, head)``: ``head(backbone_side(images))`` gives Mask2Former outputs.

    Args:
        backbone_model: a DINOv3 ViT or ConvNeXt; the backbone side freezes it.
        interaction_indexes: backbone blocks the adapter reads (4 of them, e.g. ``FOUR_EVEN_INTERVALS``).
        hidden_dim, num_classes, num_queries, nheads, dim_feedforward, enc_layers, dec_layers,
            pixel_decoder_nheads: head sizes (defaults: the official head).
        adapter_options: extra :class:`DINOv3_Adapter` keywords (``conv_inplane``, ``n_points``,
            ``deform_num_heads``, ``drop_path_rate``, ``with_cffn``, ``cffn_ratio``, ``deform_ratio``,
            ``add_vit_feature``, ``use_extra_extractor``, ``with_cp``, ``norm_layer``).

    Module and parameter names match the official checkpoints once placed in
    ``nn.ModuleList([adapter, head])``.

    A backbone with per-stage widths (``embed_dims``: a ConvNeXt) already has a stride 4..32 pyramid: its stages
    go to the head through :class:`ConvNeXtPyramid` instead of an adapter, the head's input projections sized by
    the stage widths. Adapter options other than their defaults are then an error.
    """
    if hasattr(backbone_model, "embed_dims"):
        _reject_adapter_options(adapter_options)
        backbone_side = ConvNeXtPyramid(backbone_model, interaction_indexes=list(interaction_indexes))
        in_channels = backbone_side.embed_dims
    else:
        backbone_side = DINOv3_Adapter(backbone_model, interaction_indexes=list(interaction_indexes), **adapter_options)
        in_channels = backbone_side.embed_dim
    head = Mask2FormerHead(
        in_channels=in_channels,
        hidden_dim=hidden_dim,
        num_classes=num_classes,
        num_queries=num_queries,
        nheads=nheads,
        dim_feedforward=dim_feedforward,
        enc_layers=enc_layers,
        dec_layers=dec_layers,
        pixel_decoder_nheads=pixel_decoder_nheads,
    )
    return backbone_side, head


def _reject_adapter_options(options: dict) -> None:
    # Configs always carry the adapter section; only values a user changed mean something went wrong.
    defaults = inspect.signature(DINOv3_Adapter).parameters
    unknown = sorted(k for k in options if k not in defaults)
    if unknown:
        raise TypeError(f"unknown Mask2Former options {unknown}")
    changed = sorted(k for k, v in options.items() if v != defaults[k].default)
    if changed:
        raise ValueError(f"ViT-Adapter options {changed} do not apply to a ConvNeXt backbone (it uses no adapter)")
