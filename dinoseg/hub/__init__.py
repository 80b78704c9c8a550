"""torch.hub entry points (official names): backbones, segmentors, depthers and the detector, and the patch-14 spellings
(`dinov3_vitl14` -> `dinov3_vitl16`, with a warning). `hubconf.py` re-exports these lists."""

from .backbones import *  # noqa: F403
from .backbones import __all__ as _backbones
from .depthers import *  # noqa: F403
from .depthers import __all__ as _depthers
from .detectors import *  # noqa: F403
from .detectors import __all__ as _detectors
from .patch14 import *  # noqa: F403
from .patch14 import __all__ as _patch14
from .segmentors import *  # noqa: F403
from .segmentors import __all__ as _segmentors

__all__ = sorted(set(_backbones) | set(_depthers) | set(_detectors) | set(_segmentors) | set(_patch14))
