"""Official module path of the linear depth head (``dinov3.eval.depth.models.linear_head``)."""

from .heads.linear_head import LinearHead

__all__ = ["LinearHead"]
