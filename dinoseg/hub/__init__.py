"""torch.hub entry points (official names): backbones and segmentors. `hubconf.py` re-exports these lists."""

from .backbones import *  # noqa: F403
from .backbones import __all__ as _backbones
from .segmentors import *  # noqa: F403
from .segmentors import __all__ as _segmentors

__all__ = sorted(set(_backbones) | set(_segmentors))
