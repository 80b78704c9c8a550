from .convnext import ConvNeXt
from .vision_transformer import DinoVisionTransformer

__all__ = ["ConvNeXt", "DinoVisionTransformer"]
