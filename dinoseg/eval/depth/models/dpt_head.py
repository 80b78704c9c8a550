"""Official module path of the DPT depth head (``dinov3.eval.depth.models.dpt_head``)."""

from .heads.dpt_head import (
    ConvModule,
    DPTHead,
    FeatureFusionBlock,
    Interpolate,
    PreActResidualConvUnit,
    ReassembleBlocks,
    UpConvHead,
)

__all__ = [
    "ConvModule",
    "DPTHead",
    "FeatureFusionBlock",
    "Interpolate",
    "PreActResidualConvUnit",
    "ReassembleBlocks",
    "UpConvHead",
]
