"""torch.hub entry points for depthers: the released DINOv3 ViT-7B DPT depth head (SYNTHMIX) and the CHMv2
canopy-height head on the SAT-493M ViT-L.

As for the segmentors, weights come from local files or the torch hub cache (or an explicit https URL);
nothing is downloaded implicitly. The released head files hold the ``decoder`` part of a `Depther` (keys
without the ``decoder.`` prefix); they are loaded strictly, by assignment into a head built on the meta device.
"""

import contextlib

import torch

from ..eval.depth.models import DecoderConfig, Depther, load_decoder_checkpoint, make_depther_from_config
from ..eval.depth.models.released import DepthWeights, chmv2_depther_config, dpt_depther_config, head_location
from ..models.backbones import Weights, make_backbone, needs_untied_norm, official_weights_filename
from ..models.checkpoint import CheckpointError, resolve_weights_path
from ..models.finetune import adapt_for_head_file
from ..models.precision import cast_weights


def _build(backbone_name: str, config: DecoderConfig, *, pretrained: bool, weights, default: DepthWeights,
           backbone_weights, check_hash: bool, autocast_dtype: torch.dtype, device, dtype: torch.dtype | None,
           backbone_options: dict | None) -> Depther:
    options = dict(backbone_options or {})
    if not pretrained:
        # The architecture still follows the backbone weights named (the SAT ViT-L has an extra class norm).
        if isinstance(backbone_weights, str) and backbone_weights.upper() in Weights.__members__:
            backbone_weights = Weights[backbone_weights.upper()]
        named = str(backbone_weights)
        if isinstance(backbone_weights, Weights):
            named = official_weights_filename(backbone_name, backbone_weights)
        options.setdefault("untie_global_and_local_cls_norm", needs_untied_norm(backbone_name, named))
        backbone = make_backbone(backbone_name, pretrained=False, device=device, **options)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            depther = make_depther_from_config(backbone, config, autocast_dtype=autocast_dtype)
        return cast_weights(depther, dtype) if dtype is not None else depther
    # Check the head file first: fail before spending minutes on a multi-GB backbone.
    head = str(resolve_weights_path(head_location(backbone_name, weights, default), check_hash=check_hash))
    backbone = make_backbone(backbone_name, pretrained=True, weights=backbone_weights, check_hash=check_hash,
                             dtype=dtype, **options)
    backbone = adapt_for_head_file(backbone, head, backbone_name, backbone_weights)  # a local run's adapted backbone
    with torch.device("meta"):
        depther = make_depther_from_config(backbone, config, autocast_dtype=autocast_dtype)
    load_decoder_checkpoint(depther, head)  # with the adapted tensors of a local run's adapted backbone
    left = [n for n, t in (*depther.named_parameters(), *depther.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{head}: tensors left uninitialised after loading: {', '.join(left[:5])}")
    if dtype is not None:
        cast_weights(depther, dtype)  # the head (the backbone was stored in `dtype` as it loaded)
    return depther.to(device) if device is not None else depther


def dinov3_vit7b16_dd(
    *,
    pretrained: bool = True,
    weights: DepthWeights | str = DepthWeights.SYNTHMIX,
    backbone_weights: Weights | str = Weights.LVD1689M,
    check_hash: bool = False,
    autocast_dtype: torch.dtype = torch.float32,
    depth_range: tuple[float, float] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backbone_options: dict | None = None,
) -> Depther:
    """The released DINOv3 ViT-7B/16 depther: DPT head (512 channels, layers [9, 19, 29, 39], 256 linear bins)
    trained on synthetic data, depth 0.001-100 m (`depth_range` overrides it).

    Args:
        weights: the head (``dinov3_vit7b16_synthmix_dpt_head-02040be1.pth``): a path, a ``file://`` or
            ``https://`` URL, or ``DepthWeights.SYNTHMIX`` for the file in the torch hub cache.
        backbone_weights: the ViT-7B checkpoint, as for :func:`dinoseg.hub.dinov3_vit7b16`.
        autocast_dtype: mixed precision on the input's device; float32 (the default) disables it.
        dtype: ``torch.bfloat16`` / ``torch.float16`` store the weights (backbone and head) in half precision, the
            backbone read from its float32 file tensor by tensor; normalisations stay float32 and the forward runs
            under autocast in that dtype.
        pretrained: False builds random weights (``device="meta"`` allocates nothing).
        backbone_options: architecture overrides for ``make_backbone`` (for tests and other heads).

    ``depther(images)`` returns depth [B, 1, 16 h, 16 w] in metres for a patch grid h x w; the official
    inference recipe evaluates it with flip TTA and least-squares alignment (see `evaluate_depther_with_dataloader`).
    """
    return _build("dinov3_vit7b16", dpt_depther_config("dinov3_vit7b16", depth_range), pretrained=pretrained,
                  weights=weights, default=DepthWeights.SYNTHMIX, backbone_weights=backbone_weights,
                  check_hash=check_hash, autocast_dtype=autocast_dtype, device=device, dtype=dtype,
                  backbone_options=backbone_options)


def dinov3_vitl16_chmv2(
    pretrained: bool = True,
    weights: DepthWeights | str = DepthWeights.CHMV2,
    backbone_weights: Weights | str = Weights.SAT493M,
    check_hash: bool = False,
    autocast_dtype: torch.dtype = torch.float32,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backbone_options: dict | None = None,
) -> Depther:
    """The released CHMv2 canopy-height model: DPT head (class-token readout, mixed-log bins, 0.001-96 m) on the
    SAT-493M ViT-L/16, layers [5, 11, 17, 23].

    Args:
        weights: the head (``dinov3_vitl16_chmv2_dpt_head-3703d643.pth``): a path, a ``file://`` or ``https://``
            URL, or ``DepthWeights.CHMV2`` for the file in the torch hub cache.
        backbone_weights: the ViT-L checkpoint (default: the SAT-493M satellite weights).
        Other arguments as for :func:`dinov3_vit7b16_dd`.
    """
    return _build("dinov3_vitl16", chmv2_depther_config(), pretrained=pretrained, weights=weights,
                  default=DepthWeights.CHMV2, backbone_weights=backbone_weights, check_hash=check_hash,
                  autocast_dtype=autocast_dtype, device=device, dtype=dtype, backbone_options=backbone_options)


__all__ = ["DepthWeights", "dinov3_vit7b16_dd", "dinov3_vitl16_chmv2"]
