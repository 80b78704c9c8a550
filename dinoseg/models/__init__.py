from .vision_transformer import DinoVisionTransformer

__all__ = ["DinoVisionTransformer"]
