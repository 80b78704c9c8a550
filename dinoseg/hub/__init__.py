"""torch.hub entry points (official names): backbones, segmentors, depthers and the detector, and the patch-14 spellings
(`dinov3_vitl14` -> `dinov3_vitl16`, with a warning). `hubconf.py` re-exports these lists.

Each module is imported on first use of one of its names (PEP 562): loading a backbone does not import the
segmentation, depth or detection heads (nor the detector's torchvision operations)."""

import importlib

# Module -> its entry points (its `__all__`; tests/test_startup.py keeps the two equal).
_MODULES = {
    "backbones": (
        "Weights", "dinov3_convnext_base", "dinov3_convnext_large", "dinov3_convnext_small", "dinov3_convnext_tiny",
        "dinov3_vit7b16", "dinov3_vitb16", "dinov3_vith16plus", "dinov3_vitl16", "dinov3_vitl16plus", "dinov3_vits16",
        "dinov3_vits16plus",
    ),
    "depthers": ("DepthWeights", "dinov3_vit7b16_dd", "dinov3_vitl16_chmv2"),
    "detectors": ("DetectionWeights", "DetectorWithProcessor", "dinov3_vit7b16_de"),
    "patch14": (
        "PATCH14_ALIASES", "dinov3_vit7b14", "dinov3_vit7b14_ade20k_linear", "dinov3_vit7b14_ms", "dinov3_vitb14",
        "dinov3_vitb14_ade20k_linear", "dinov3_vith14plus", "dinov3_vith14plus_ade20k_linear", "dinov3_vitl14",
        "dinov3_vitl14_ade20k_linear", "dinov3_vitl14plus", "dinov3_vitl14plus_ade20k_linear", "dinov3_vits14",
        "dinov3_vits14_ade20k_linear", "dinov3_vits14plus", "dinov3_vits14plus_ade20k_linear",
    ),
    "segmentors": (
        "SegmentorWeights", "make_linear_segmentor", "dinov3_vit7b16_ade20k_linear", "dinov3_vit7b16_ms",
        "dinov3_vitb16_ade20k_linear", "dinov3_vith16plus_ade20k_linear", "dinov3_vitl16_ade20k_linear",
        "dinov3_vitl16plus_ade20k_linear", "dinov3_vits16_ade20k_linear", "dinov3_vits16plus_ade20k_linear",
    ),
}
_SOURCE = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_SOURCE)


def __getattr__(name: str):
    if name in _MODULES:  # `dinoseg.hub.segmentors`, before anything imported it
        return importlib.import_module(f".{name}", __name__)
    if name not in _SOURCE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
