"""The detector head's settings at their official path (`dinov3.eval.detection.config`)."""

from .models import DetectionHeadConfig
from .models.position_encoding import PositionEncoding

__all__ = ["DetectionHeadConfig", "PositionEncoding"]
