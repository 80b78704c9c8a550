from .backbones import ARCHS, Weights, build_backbone, make_backbone
from .checkpoint import CheckpointError
from .vision_transformer import DinoVisionTransformer

__all__ = ["ARCHS", "CheckpointError", "DinoVisionTransformer", "Weights", "build_backbone", "make_backbone"]
