"""The ViT-Adapter + Mask2Former pair behind ``build_segmentation_decoder(decoder_type="m2f")`` (on a ConvNeXt:
its stage pyramid + Mask2Former), and its options.

The option dataclasses are also the ``decoder_head.m2f`` config section: the config hands them over unchanged.
Defaults are the official head's; changing a shape breaks the released checkpoints.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from .backbone.convnext_pyramid import ConvNeXtPyramid
from .backbone.dinov3_adapter import DINOv3_Adapter
from .heads.mask2former_head import Mask2FormerHead

logger = logging.getLogger("dinoseg")
_warned: set[str] = set()


@dataclass
class AdapterOptions:
    conv_inplane: int = 64  # spatial prior module width
    n_points: int = 4  # deformable sampling points per head and level
    deform_num_heads: int = 16
    drop_path_rate: float = 0.3  # stochastic depth of the extractor FFNs (training only)
    with_cffn: bool = True  # the ConvFFN after each extractor
    cffn_ratio: float = 0.25
    deform_ratio: float = 0.5  # value projection width / embed_dim in the extractors
    use_extra_extractor: bool = True  # two more extractors on the last interaction
    with_cp: bool = True  # gradient checkpointing of the extractors (less memory, more compute)
    # Autocast dtype of the backbone alone ("bfloat16": the official adapter's hard-coded choice); None: the
    # segmentor's precision.
    backbone_dtype: str | None = None


@dataclass
class Mask2FormerOptions:
    adapter: AdapterOptions = field(default_factory=AdapterOptions)
    num_queries: int = 100
    nheads: int = 16
    dim_feedforward: int = 4096
    enc_layers: int = 6
    dec_layers: int = 9
    pixel_decoder_nheads: int = 16


def _dtype(name: str | None):
    if name is None:
        return None
    if name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"adapter backbone_dtype must be bfloat16, float16, float32 or None, got {name!r}")
    return getattr(torch, name)


def build_m2f_modules(
    backbone_model: nn.Module,
    interaction_indexes: Sequence[int],
    hidden_dim: int = 2048,
    num_classes: int = 150,
    options: Mask2FormerOptions | None = None,
) -> tuple[DINOv3_Adapter | ConvNeXtPyramid, Mask2FormerHead]:
    """``(backbone_side, head)``: ``head(backbone_side(images))`` gives Mask2Former outputs; the backbone side
    freezes the backbone. Module and parameter names match the official checkpoints once placed in
    ``nn.ModuleList([backbone_side, head])``.

    A backbone with per-stage widths (``embed_dims``: a ConvNeXt) already has a stride 4..32 pyramid: its stages
    go to the head through :class:`ConvNeXtPyramid` instead of an adapter, the head's input projections sized by
    the stage widths. The adapter's shape options then have nothing to shape: values other than their defaults are
    ignored with one warning naming them (a config written for a ViT runs on a ConvNeXt unchanged);
    ``adapter.backbone_dtype`` still sets the backbone's autocast dtype.
    """
    o = options or Mask2FormerOptions()
    a = o.adapter
    if hasattr(backbone_model, "embed_dims"):
        default = AdapterOptions()
        ignored = [f"decoder_head.m2f.adapter.{f.name}={getattr(a, f.name)!r}" for f in fields(a)
                   if f.name != "backbone_dtype" and getattr(a, f.name) != getattr(default, f.name)]
        message = ("ViT-Adapter options ignored: a ConvNeXt feeds Mask2Former its own stages, without an adapter: "
                   + ", ".join(ignored))
        if ignored and message not in _warned:
            _warned.add(message)
            logger.warning(message)
        backbone_side = ConvNeXtPyramid(backbone_model, interaction_indexes=list(interaction_indexes),
                                        backbone_dtype=_dtype(a.backbone_dtype))
        in_channels = backbone_side.embed_dims
    else:
        backbone_side = DINOv3_Adapter(
            backbone_model,
            interaction_indexes=list(interaction_indexes),
            conv_inplane=a.conv_inplane,
            n_points=a.n_points,
            deform_num_heads=a.deform_num_heads,
            drop_path_rate=a.drop_path_rate,
            with_cffn=a.with_cffn,
            cffn_ratio=a.cffn_ratio,
            deform_ratio=a.deform_ratio,
            use_extra_extractor=a.use_extra_extractor,
            with_cp=a.with_cp,
            backbone_dtype=_dtype(a.backbone_dtype),
        )
        in_channels = backbone_side.embed_dim
    head = Mask2FormerHead(
        in_channels,
        hidden_dim=hidden_dim,
        num_classes=num_classes,
        ignore_value=255,
        num_queries=o.num_queries,
        nheads=o.nheads,
        dim_feedforward=o.dim_feedforward,
        enc_layers=o.enc_layers,
        dec_layers=o.dec_layers,
        pixel_decoder_nheads=o.pixel_decoder_nheads,
    )
    return backbone_side, head
