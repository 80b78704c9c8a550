"""torch.hub entry points for segmentors: the released ViT-7B + ViT-Adapter + Mask2Former ADE20K model, and
linear ADE20K heads on every ViT (with a head checkpoint of your own).

Weights come from local files (or an explicit https URL); nothing is downloaded implicitly. The head is built on
the meta device and its checkpoint tensors are assigned, so its memory is spent once; the backbone is loaded the
same way. Loading is strict: one `CheckpointError` names the file and the missing / unexpected / mis-shaped keys.
"""

import contextlib
import functools
import inspect

import torch

from ..eval.segmentation.models import (
    BackboneLayersSet,
    DecoderType,
    FeatureDecoder,
    Mask2FormerOptions,
    build_segmentation_decoder,
    build_segmentor_with_head,
)
from ..eval.segmentation.models.released import M2F_HEAD_HASHES, SegmentorWeights, head_location
from ..models.backbones import Weights, make_backbone
from ..models.checkpoint import CheckpointError, load_state_dict_file, resolve_weights_path
from ..models.finetune import adapt_for_head_file
from ..models.precision import cast_weights


def _segmentor(backbone_name: str, *, pretrained: bool, weights, backbone_weights, check_hash: bool, device,
               dtype: torch.dtype | None, backbone_options: dict | None, file_hash: str | None = None,
               **decoder_args) -> FeatureDecoder:
    options = backbone_options or {}
    if not pretrained:
        backbone = make_backbone(backbone_name, pretrained=False, device=device, **options)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            segmentor = build_segmentation_decoder(backbone, **decoder_args)
        return cast_weights(segmentor, dtype) if dtype is not None else segmentor
    location = head_location(backbone_name, weights, released=backbone_name in M2F_HEAD_HASHES and
                             decoder_args["decoder_type"] is DecoderType.M2F, file_hash=file_hash)
    # Check the head file first (memory-mapped: cheap): fail before spending minutes on a multi-GB backbone.
    head = resolve_weights_path(location, check_hash=check_hash)
    load_state_dict_file(head)
    backbone = make_backbone(backbone_name, pretrained=True, weights=backbone_weights, check_hash=check_hash,
                             dtype=dtype, **options)
    backbone = adapt_for_head_file(backbone, head, backbone_name, backbone_weights)  # a local run's adapted backbone
    segmentor = build_segmentor_with_head(backbone, str(head), source=location, dtype=dtype, **decoder_args)
    return segmentor.to(device) if device is not None else segmentor


def dinov3_vit7b16_ms(
    *,
    pretrained: bool = True,
    weights: SegmentorWeights | str = SegmentorWeights.ADE20K,
    backbone_weights: Weights | str = Weights.LVD1689M,
    check_hash: bool = False,
    autocast_dtype: torch.dtype = torch.bfloat16,
    hidden_dim: int = 2048,
    hash: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    num_classes: int = 150,
    m2f_options: Mask2FormerOptions | None = None,
    backbone_options: dict | None = None,
) -> FeatureDecoder:
    """The released DINOv3 ViT-7B/16 + ViT-Adapter + Mask2Former ADE20K segmentor (hidden 2048, 150 classes).

    Args:
        weights: the head checkpoint (``dinov3_vit7b16_ade20k_m2f_head-bf307cb1.pth``): a path, a ``file://``
            or ``https://`` URL, or ``SegmentorWeights.ADE20K`` to use the file in the torch hub cache.
        backbone_weights: the ViT-7B checkpoint, as for :func:`dinoseg.hub.dinov3_vit7b16`.
        autocast_dtype: mixed precision of the forward pass on the input's device (float32 disables it;
            the deformable attention and the pixel decoder always run in float32).
        hidden_dim, hash: the official extra keywords: the head width, and another hash in the released head's
            file name (``weights=SegmentorWeights.ADE20K``).
        pretrained: False builds random weights instead (``device="meta"`` allocates nothing).
        device: where the segmentor ends up.
        dtype: ``torch.bfloat16`` / ``torch.float16`` store the weights in half precision (about 14 GB instead
            of 28 GB for the ViT-7B; normalisations, RoPE periods, the deformable attention and the pixel decoder
            stay float32), read tensor by tensor so host memory never holds a float32 copy.
        num_classes, m2f_options, backbone_options: other heads of the same architecture
            (``backbone_options``: architecture overrides for ``make_backbone``).

    ``segmentor.predict(x, rescale_to=(H, W))`` returns ``{"pred_logits", "pred_masks"}``; feed it to
    ``dinoseg.eval.segmentation.inference`` for class scores, sliding windows and TTA.
    """
    return _segmentor("dinov3_vit7b16", pretrained=pretrained, weights=weights, backbone_weights=backbone_weights,
                      check_hash=check_hash, device=device, dtype=dtype, backbone_options=backbone_options,
                      file_hash=hash,
                      backbone_out_layers=BackboneLayersSet.FOUR_EVEN_INTERVALS, decoder_type=DecoderType.M2F,
                      hidden_dim=hidden_dim, num_classes=num_classes, autocast_dtype=autocast_dtype,
                      m2f_options=m2f_options)


def make_linear_segmentor(
    backbone_name: str,
    *,
    pretrained: bool = True,
    weights: str | None = None,
    backbone_weights: Weights | str = Weights.LVD1689M,
    backbone_out_layers: BackboneLayersSet | str = BackboneLayersSet.LAST,
    num_classes: int = 150,
    use_cls_token: bool = False,
    check_hash: bool = False,
    autocast_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backbone_options: dict | None = None,
) -> FeatureDecoder:
    """Linear segmentor on a DINOv3 hub backbone. `weights`: a linear head checkpoint with official keys
    (`segmentation_model.1.batchnorm_layer.*`, `segmentation_model.1.conv.*`) trained on `backbone_out_layers`;
    `backbone_weights` as for the backbone's hub function. `pretrained=False` builds random weights
    (`device='meta'` allocates nothing); `dtype` stores the weights in half precision; `backbone_options` overrides
    the backbone architecture."""
    try:
        return _segmentor(backbone_name, pretrained=pretrained, weights=weights, backbone_weights=backbone_weights,
                          check_hash=check_hash, device=device, dtype=dtype, backbone_options=backbone_options,
                          backbone_out_layers=backbone_out_layers, decoder_type=DecoderType.LINEAR,
                          num_classes=num_classes, autocast_dtype=autocast_dtype, use_cls_token=use_cls_token)
    except CheckpointError as e:
        if "conv.weight" in str(e) or "batchnorm_layer" in str(e):
            raise CheckpointError(
                f"{e} (the head was trained on other backbone layers: set backbone_out_layers to LAST, FOUR_LAST "
                f"or FOUR_EVEN_INTERVALS and use_cls_token to match it)"
            ) from None
        raise


def _linear(fn):
    """A linear-segmentor hub function: its body names the backbone; help() shows `make_linear_segmentor`'s keywords."""
    backbone_name = fn.__name__.removesuffix("_ade20k_linear")

    @functools.wraps(fn)
    def wrapper(**kwargs) -> FeatureDecoder:
        return make_linear_segmentor(backbone_name, **kwargs)

    signature = inspect.signature(make_linear_segmentor)
    wrapper.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    return wrapper


@_linear
def dinov3_vits16_ade20k_linear(**kwargs):
    """Linear ADE20K segmentor on dinov3_vits16 (keywords: `make_linear_segmentor`)."""


@_linear
def dinov3_vits16plus_ade20k_linear(**kwargs):
    """Linear ADE20K segmentor on dinov3_vits16plus (keywords: `make_linear_segmentor`)."""


@_linear
def dinov3_vitb16_ade20k_linear(**kwargs):
    """Linear ADE20K segmentor on dinov3_vitb16 (keywords: `make_linear_segmentor`)."""


@_linear
def dinov3_vitl16_ade20k_linear(**kwargs):
    """Linear ADE20K segmentor on dinov3_vitl16 (keywords: `make_linear_segmentor`)."""


@_linear
def dinov3_vitl16plus_ade20k_linear(**kwargs):
    """Linear ADE20K segmentor on dinov3_vitl16plus (keywords: `make_linear_segmentor`)."""


@_linear
def dinov3_vith16plus_ade20k_linear(**kwargs):
    """Linear ADE20K segmentor on dinov3_vith16plus (keywords: `make_linear_segmentor`)."""


@_linear
def dinov3_vit7b16_ade20k_linear(**kwargs):
    """Linear ADE20K segmentor on dinov3_vit7b16 (keywords: `make_linear_segmentor`)."""


__all__ = ["SegmentorWeights", "make_linear_segmentor"] + [name for name in dir() if name.startswith("dinov3_")]
