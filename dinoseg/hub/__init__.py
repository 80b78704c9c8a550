from .backbones import (
    ARCHS,
    Weights,
    dinov3_vit7b16,
    dinov3_vitb16,
    dinov3_vith16plus,
    dinov3_vitl16,
    dinov3_vitl16plus,
    dinov3_vits16,
    dinov3_vits16plus,
    make_backbone,
)
from .checkpoint import CheckpointError, load_state_dict_file, load_state_dict_strict

__all__ = [
    "ARCHS",
    "CheckpointError",
    "Weights",
    "dinov3_vit7b16",
    "dinov3_vitb16",
    "dinov3_vith16plus",
    "dinov3_vitl16",
    "dinov3_vitl16plus",
    "dinov3_vits16",
    "dinov3_vits16plus",
    "load_state_dict_file",
    "load_state_dict_strict",
    "make_backbone",
]
