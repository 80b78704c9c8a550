from .backbones import ARCHS, Weights, build_backbone, make_backbone
from .checkpoint import CheckpointError
from .convnext import ConvNeXt
from .vision_transformer import DinoVisionTransformer

__all__ = ["ARCHS", "CheckpointError", "ConvNeXt", "DinoVisionTransformer", "Weights", "build_backbone", "make_backbone"]
