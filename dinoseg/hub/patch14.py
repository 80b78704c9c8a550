"""The `*14` spellings of the hub names (DINOv2's patch size, used by the project's seed document):
`dinov3_vitl14` is `dinov3_vitl16`, `dinov3_vitl14_ade20k_linear` is `dinov3_vitl16_ade20k_linear`, ...
DINOv3 ViTs have patch size 16; each call logs one warning line saying which model it loads."""

import functools
import logging

from . import backbones, segmentors

logger = logging.getLogger("dinoseg")


def _alias(alias: str, target):
    @functools.wraps(target)
    def load(*args, **kwargs):
        logger.warning("%s: DINOv3 ViTs have patch size 16, not 14; loading %s", alias, target.__name__)
        return target(*args, **kwargs)

    load.__name__ = load.__qualname__ = alias
    load.__doc__ = f"`{target.__name__}` under its patch-14 spelling (DINOv3 ViTs have patch size 16).\n\n{target.__doc__}"
    return load


# alias -> hub name, for every ViT hub name (ConvNeXts have no patch size in their names).
PATCH14_ALIASES = {
    name.replace("16", "14", 1): name
    for module in (backbones, segmentors)
    for name in module.__all__
    if name.startswith("dinov3_vit") and "16" in name
}
for _alias_name, _target in PATCH14_ALIASES.items():
    globals()[_alias_name] = _alias(_alias_name, getattr(segmentors if _target in segmentors.__all__ else backbones, _target))

__all__ = ["PATCH14_ALIASES", *sorted(PATCH14_ALIASES)]
