"""dinoseg: semantic segmentation on frozen DINOv3 backbones."""

from .eval.utils import BackboneLayersSet, ModelWithIntermediateLayers, get_backbone_out_indices
from .hub.backbones import (
    Weights,
    dinov3_vit7b16,
    dinov3_vitb16,
    dinov3_vith16plus,
    dinov3_vitl16,
    dinov3_vitl16plus,
    dinov3_vits16,
    dinov3_vits16plus,
)
from .models.vision_transformer import DinoVisionTransformer

__version__ = "0.1.0"

__all__ = [
    "BackboneLayersSet",
    "DinoVisionTransformer",
    "ModelWithIntermediateLayers",
    "Weights",
    "dinov3_vit7b16",
    "dinov3_vitb16",
    "dinov3_vith16plus",
    "dinov3_vitl16",
    "dinov3_vitl16plus",
    "dinov3_vits16",
    "dinov3_vits16plus",
    "get_backbone_out_indices",
]
