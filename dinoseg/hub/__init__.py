"""torch.hub entry points (official names): backbones, segmentors and depthers. `hubconf.py` re-exports these lists."""

from .backbones import *  # noqa: F403
from .backbones import __all__ as _backbones
from .depthers import *  # noqa: F403
from .depthers import __all__ as _depthers
from .segmentors import *  # noqa: F403
from .segmentors import __all__ as _segmentors

__all__ = sorted(set(_backbones) | set(_depthers) | set(_segmentors))
