"""DINOv3 ViT backbones: the official architectures and released weights, and the factory behind the hub functions.

Nothing is downloaded unless the user passes an `https://` URL: the official weight sets (the `Weights` enum)
are looked up in the torch hub cache, and a clear error says where to get them when they are not there.
"""

import contextlib
import functools
import os
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    convert_hf_dinov3_state_dict,
    find_in_hub_cache,
    is_hf_dinov3_state_dict,
    load_state_dict_file,
    load_state_dict_strict,
)
from .convnext import ConvNeXt
from .precision import cast_weights, float32_names, storage_dtype
from .vision_transformer import DinoVisionTransformer

DINOV3_BASE_URL = "https://dl.fbaipublicfiles.com/dinov3"


class Weights(Enum):
    LVD1689M = "LVD1689M"
    SAT493M = "SAT493M"


_COMMON = dict(
    patch_size=16,
    pos_embed_rope_base=100,
    pos_embed_rope_normalize_coords="separate",
    pos_embed_rope_rescale_coords=2,
    pos_embed_rope_dtype="fp32",
    layerscale_init=1.0e-05,
    norm_layer="layernormbf16",
    ffn_bias=True,
    proj_bias=True,
    n_storage_tokens=4,
    mask_k_bias=True,
)

# name -> (compact arch, architecture keywords, {weights: file hash})
ARCHS: dict[str, tuple[str, dict, dict]] = {
    "dinov3_vits16": ("vits16", dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4, ffn_layer="mlp"),
                      {Weights.LVD1689M: "08c60483"}),
    "dinov3_vits16plus": ("vits16plus", dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6, ffn_layer="swiglu"),
                          {Weights.LVD1689M: "4057cbaa"}),
    "dinov3_vitb16": ("vitb16", dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4, ffn_layer="mlp"),
                      {Weights.LVD1689M: "73cec8be"}),
    "dinov3_vitl16": ("vitl16", dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4, ffn_layer="mlp"),
                      {Weights.LVD1689M: "8aa4cbdd", Weights.SAT493M: "eadcf0ff"}),
    "dinov3_vitl16plus": ("vitl16plus",
                          dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=6.0, ffn_layer="swiglu"),
                          {Weights.LVD1689M: "46503df0"}),
    "dinov3_vith16plus": ("vith16plus",
                          dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6.0, ffn_layer="swiglu"),
                          {Weights.LVD1689M: "7c1da9a5"}),
    "dinov3_vit7b16": ("vit7b16",
                       dict(embed_dim=4096, depth=40, num_heads=32, ffn_ratio=3, ffn_layer="swiglu64", qkv_bias=False,
                            untie_global_and_local_cls_norm=True),
                       {Weights.LVD1689M: "a955f4ea", Weights.SAT493M: "a6675841"}),
}
# ConvNeXts distilled from the ViT-7B: name -> (compact arch, architecture keywords, {weights: file hash});
# all use layer scale 1e-6 and no pseudo patch size.
CONVNEXT_ARCHS: dict[str, tuple[str, dict, dict]] = {
    "dinov3_convnext_tiny": ("convnext_tiny", dict(depths=[3, 3, 9, 3], dims=[96, 192, 384, 768]),
                             {Weights.LVD1689M: "21b726bb"}),
    "dinov3_convnext_small": ("convnext_small", dict(depths=[3, 3, 27, 3], dims=[96, 192, 384, 768]),
                              {Weights.LVD1689M: "296db49d"}),
    "dinov3_convnext_base": ("convnext_base", dict(depths=[3, 3, 27, 3], dims=[128, 256, 512, 1024]),
                             {Weights.LVD1689M: "801f2ba9"}),
    "dinov3_convnext_large": ("convnext_large", dict(depths=[3, 3, 27, 3], dims=[192, 384, 768, 1536]),
                              {Weights.LVD1689M: "61fa432d"}),
}
# Checkpoints whose backbone carries the extra local class-token norm (the 7B ones and ViT-L SAT).
_UNTIED_HASHES = {"eadcf0ff", "a955f4ea", "a6675841"}


def official_weights_filename(name: str, weights: Weights) -> str:
    arch, _, hashes = ARCHS[name] if name in ARCHS else CONVNEXT_ARCHS[name]
    if weights not in hashes:
        raise ValueError(f"{name}: no official {weights.value} weights; available: {[w.value for w in hashes]}")
    return f"dinov3_{arch}_pretrain_{weights.value.lower()}-{hashes[weights]}.pth"


def official_weights_url(name: str, weights: Weights) -> str:
    arch = ARCHS[name][0] if name in ARCHS else CONVNEXT_ARCHS[name][0]
    return f"{DINOV3_BASE_URL}/dinov3_{arch}/{official_weights_filename(name, weights)}"


def backbone_kwargs(name: str, **overrides) -> dict:
    if name not in ARCHS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(ARCHS) + sorted(CONVNEXT_ARCHS)}")
    kwargs = {**_COMMON, **ARCHS[name][1]}
    kwargs.update(overrides)
    return kwargs


def _weights_location(name: str, weights) -> str:
    if isinstance(weights, str) and weights.upper() in Weights.__members__:
        weights = Weights[weights.upper()]
    if isinstance(weights, Weights):
        return str(find_in_hub_cache(official_weights_filename(name, weights), f"official {weights.value} weights of {name}",
                                     official_weights_url(name, weights)))
    return str(weights)


def needs_untied_norm(name: str, location: str) -> bool:
    if name == "dinov3_vit7b16":
        return True
    return any(f"-{h}." in os.path.basename(location) for h in _UNTIED_HASHES)


def load_backbone_weights(model: nn.Module, location: str, check_hash: bool = False, dtype: torch.dtype | None = None):
    """Load an official or Hugging Face checkpoint into `model`, strictly; `dtype` (bfloat16 / float16) stores
    the weights in half precision, converted tensor by tensor as they are read (see `dinoseg.models.precision`)."""
    dtype_of = None
    if dtype is not None and dtype != torch.float32:
        keep = float32_names(model)
        dtype_of = functools.partial(storage_dtype, dtype=dtype, keep=keep)
    state_dict = load_state_dict_file(location, check_hash=check_hash, dtype_of=dtype_of)
    if is_hf_dinov3_state_dict(state_dict):
        periods = model.rope_embed.periods
        if periods.device.type == "meta":
            periods = _fresh_periods(model)
        state_dict = convert_hf_dinov3_state_dict(state_dict, periods)
        if model.local_cls_norm is not None and "local_cls_norm.weight" not in state_dict:
            # HF checkpoints drop the pre-training-only local class norm; keep ours (unused at inference).
            state_dict["local_cls_norm.weight"] = torch.ones(model.embed_dim)
            state_dict["local_cls_norm.bias"] = torch.zeros(model.embed_dim)
    on_meta = next(iter(model.parameters())).device.type == "meta"
    load_state_dict_strict(model, state_dict, source=location, assign=on_meta)
    return cast_weights(model, dtype) if dtype is not None else model


def _fresh_periods(model: DinoVisionTransformer) -> torch.Tensor:
    rope = model.rope_embed
    n = rope.d_head // 4
    if rope.base is not None:
        return rope.base ** (2 * torch.arange(n, dtype=rope.dtype) / (rope.d_head // 2))
    ratio = rope.max_period / rope.min_period
    return ratio ** torch.linspace(0, 1, n, dtype=rope.dtype) / ratio * rope.max_period


def make_backbone(
    name: str,
    *,
    pretrained: bool = True,
    weights: Weights | str = Weights.LVD1689M,
    check_hash: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
) -> DinoVisionTransformer | ConvNeXt:
    """Build a hub backbone (a ViT or a ConvNeXt). With weights it is built on the meta device and the checkpoint
    tensors are assigned (memory-mapped, or converted to `dtype` one by one as they are read), so memory is spent
    once (this matters for the 6.7B-parameter ViT-7B). `dtype`: bfloat16 or float16 stores the weights in half
    precision (normalisations and RoPE periods stay float32); `kwargs` override the architecture."""
    if name not in ARCHS and name not in CONVNEXT_ARCHS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(ARCHS) + sorted(CONVNEXT_ARCHS)}")
    if name in CONVNEXT_ARCHS:
        arch, model_cls = {**CONVNEXT_ARCHS[name][1], **kwargs}, ConvNeXt
    else:
        location = _weights_location(name, weights) if pretrained else None
        if location is not None and "untie_global_and_local_cls_norm" not in kwargs:
            kwargs["untie_global_and_local_cls_norm"] = needs_untied_norm(name, location)
        arch, model_cls = backbone_kwargs(name, **kwargs), DinoVisionTransformer
    if not pretrained:
        model = model_cls(**arch, device=device)
        return cast_weights(model, dtype) if dtype is not None else model
    location = _weights_location(name, weights)
    model = model_cls(**arch, device="meta")
    load_backbone_weights(model, location, check_hash=check_hash, dtype=dtype)
    return model.to(device) if device is not None else model


def load_hf_backbone(path: str | os.PathLike, device: torch.device | str | None = None) -> DinoVisionTransformer:
    """Build a backbone from a Hugging Face `DINOv3ViTModel` directory (config.json + safetensors)."""
    from .checkpoint import hf_config_to_official_kwargs, read_hf_config

    path = Path(path).expanduser()
    config = read_hf_config(path)
    if config is None:
        raise CheckpointError(f"{path}: no config.json next to the Hugging Face checkpoint")
    model = DinoVisionTransformer(**hf_config_to_official_kwargs(config), device="meta")
    load_backbone_weights(model, str(path))
    return model.to(device) if device is not None else model


@contextlib.contextmanager
def _seeded(seed: int):
    # Random backbone weights must be the same in train, eval and predict: draw them from a fixed seed
    # without disturbing the caller's RNG stream.
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def build_backbone(
    dino_hub: str | None,
    pretrained_weights: str | None = None,
    backbone_kwargs: dict | None = None,
    random_init_seed: int = 0,
    dtype: torch.dtype | None = None,
    *,
    random_init: bool = False,
) -> nn.Module:
    """The backbone of a config's `model` section: a hub architecture (`dino_hub`, with `backbone_kwargs` overriding
    its keywords) or a custom ViT (`dino_hub=None`: `backbone_kwargs` are the constructor's), with
    `pretrained_weights` (without them, a hub name's LVD1689M weights from the torch hub cache), or random weights
    drawn from `random_init_seed` when `random_init` asks for them (demos and tests); `dtype` as for `make_backbone`.
    Weights that are neither given nor cached, without `random_init`, are an error saying where they were looked
    for and how to pass them: a random backbone is never built silently."""
    kwargs = dict(backbone_kwargs or {})
    if random_init and pretrained_weights:
        raise ValueError(f"random_init=True and pretrained_weights={pretrained_weights!r}: choose one")
    if not random_init and not pretrained_weights and dino_hub is None:
        raise CheckpointError("model.dino_hub=null (a custom architecture from model.backbone_kwargs) has no released "
                              "weights: pass model.pretrained_weights=<checkpoint>, or model.random_init=true for "
                              "random weights (demos, tests)")
    released = str(pretrained_weights or Weights.LVD1689M.value).upper()  # a weight-set name: the hub cache's file
    if not random_init and dino_hub is not None and released in Weights.__members__:
        try:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / official_weights_filename(dino_hub, Weights[released])
        except ValueError as e:
            raise CheckpointError(f"model.pretrained_weights={pretrained_weights}: {e}") from None
        if not cached.exists():
            given = (f"model.pretrained_weights={pretrained_weights}: the released {released} weights of {dino_hub} are"
                     if pretrained_weights else f"model.dino_hub={dino_hub}: no weights given (model.pretrained_weights), "
                     f"and its released {released} weights are")
            raise CheckpointError(
                f"{given} not in the torch hub cache ({cached} not found); dinoseg never downloads implicitly: pass "
                f"model.pretrained_weights=<file, directory or https URL> (the released file: "
                f"{official_weights_url(dino_hub, Weights[released])}), or model.random_init=true for random weights "
                f"(demos, tests)")
    with _seeded(random_init_seed):
        if dino_hub is not None:
            return make_backbone(dino_hub, pretrained=not random_init, weights=pretrained_weights or Weights.LVD1689M,
                                 dtype=dtype, **kwargs)
        if random_init:
            backbone = DinoVisionTransformer(**kwargs)
            return cast_weights(backbone, dtype) if dtype is not None else backbone
        backbone = DinoVisionTransformer(**kwargs, device="meta")  # weights are assigned, not copied
        return load_backbone_weights(backbone, pretrained_weights, dtype=dtype)
