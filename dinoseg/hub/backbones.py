"""torch.hub entry points for the DINOv3 ViT and ConvNeXt backbones (official names and keywords).

`weights`: a local path, a file:// or https:// URL, a Hugging Face DINOv3ViTModel directory or safetensors file,
or a `Weights` member (looked up in the torch hub cache; never downloaded implicitly). `pretrained=False` gives
random weights (`device="meta"` allocates nothing). Other keywords override the architecture.
"""

from ..models.backbones import Weights, make_backbone


def dinov3_vits16(
    *, pretrained: bool = True, weights: Weights | str = Weights.LVD1689M, check_hash: bool = False, **kwargs
):
    """DINOv3 ViT-S/16, 21.6M parameters."""
    return make_backbone("dinov3_vits16", pretrained=pretrained, weights=weights, check_hash=check_hash, **kwargs)


def dinov3_vits16plus(
    *, pretrained: bool = True, weights: Weights | str = Weights.LVD1689M, check_hash: bool = False, **kwargs
):
    """DINOv3 ViT-S+/16 (SwiGLU), 28.7M parameters."""
    return make_backbone("dinov3_vits16plus", pretrained=pretrained, weights=weights, check_hash=check_hash, **kwargs)


def dinov3_vitb16(
    *, pretrained: bool = True, weights: Weights | str = Weights.LVD1689M, check_hash: bool = False, **kwargs
):
    """DINOv3 ViT-B/16, 85.7M parameters."""
    return make_backbone("dinov3_vitb16", pretrained=pretrained, weights=weights, check_hash=check_hash, **kwargs)


def dinov3_vitl16(
    *, pretrained: bool = True, weights: Weights | str = Weights.LVD1689M, check_hash: bool = False, **kwargs
):
    """DINOv3 ViT-L/16, 303M parameters (LVD-1689M or SAT-493M weights)."""
    return make_backbone("dinov3_vitl16", pretrained=pretrained, weights=weights, check_hash=check_hash, **kwargs)


def dinov3_vitl16plus(
    *, pretrained: bool = True, weights: Weights | str = Weights.LVD1689M, check_hash: bool = False, **kwargs
):
    """DINOv3 ViT-L+/16 (SwiGLU), 404M parameters."""
    return make_backbone("dinov3_vitl16plus", pretrained=pretrained, weights=weights, check_hash=check_hash, **kwargs)


def dinov3_vith16plus(
    *, pretrained: bool = True, weights: Weights | str = Weights.LVD1689M, check_hash: bool = False, **kwargs
):
    """DINOv3 ViT-H+/16 (SwiGLU), 841M parameters."""
    return make_backbone("dinov3_vith16plus", pretrained=pretrained, weights=weights, check_hash=check_hash, **kwargs)


def dinov3_vit7b16(
    *, pretrained: bool = True, weights: Weights | str = Weights.LVD1689M, check_hash: bool = False, **kwargs
):
    """DINOv3 ViT-7B/16, 6.7B parameters (LVD-1689M or SAT-493M weights)."""
    return make_backbone("dinov3_vit7b16", pretrained=pretrained, weights=weights, check_hash=check_hash, **kwargs)


def dinov3_convnext_tiny(
    *, pretrained: bool = True, weights: Weights | str = Weights.LVD1689M, check_hash: bool = False, **kwargs
):
    """DINOv3 ConvNeXt-Tiny (distilled), 27.8M parameters."""
    return make_backbone("dinov3_convnext_tiny", pretrained=pretrained, weights=weights, check_hash=check_hash, **kwargs)


def dinov3_convnext_small(
    *, pretrained: bool = True, weights: Weights | str = Weights.LVD1689M, check_hash: bool = False, **kwargs
):
    """DINOv3 ConvNeXt-Small (distilled), 49.5M parameters."""
    return make_backbone("dinov3_convnext_small", pretrained=pretrained, weights=weights, check_hash=check_hash, **kwargs)


def dinov3_convnext_base(
    *, pretrained: bool = True, weights: Weights | str = Weights.LVD1689M, check_hash: bool = False, **kwargs
):
    """DINOv3 ConvNeXt-Base (distilled), 87.6M parameters."""
    return make_backbone("dinov3_convnext_base", pretrained=pretrained, weights=weights, check_hash=check_hash, **kwargs)


def dinov3_convnext_large(
    *, pretrained: bool = True, weights: Weights | str = Weights.LVD1689M, check_hash: bool = False, **kwargs
):
    """DINOv3 ConvNeXt-Large (distilled), 196.2M parameters."""
    return make_backbone("dinov3_convnext_large", pretrained=pretrained, weights=weights, check_hash=check_hash, **kwargs)


__all__ = ["Weights"] + [name for name in dir() if name.startswith("dinov3_")]
