from .dpt_head import DPTHead
from .linear_head import LinearHead

__all__ = ["DPTHead", "LinearHead"]
