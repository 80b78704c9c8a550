"""Hub segmentors: the released ViT-7B + ViT-Adapter + Mask2Former ADE20K model, and linear ADE20K heads.

Weights come from local files (or an explicit https URL); nothing is downloaded implicitly. The segmentor's
non-backbone part is built on the meta device and the checkpoint tensors are assigned to it, so its memory
is spent once; the backbone is loaded the same way by :func:`dinoseg.hub.backbones.make_backbone`.
Loading is strict: one :class:`CheckpointError` names the file and the missing / unexpected / mis-shaped keys.
"""

import contextlib
import inspect
from enum import Enum
from pathlib import Path

import torch

from ..eval.segmentation.models import BackboneLayersSet, FeatureDecoder, build_segmentation_decoder
from .backbones import ARCHS, DINOV3_BASE_URL, Weights, make_backbone
from .checkpoint import CheckpointError, load_state_dict_file, resolve_weights_path


class SegmentorWeights(Enum):
    ADE20K = "ADE20K"


# Released Mask2Former heads: backbone name -> file hash.
M2F_HEAD_HASHES = {"dinov3_vit7b16": "bf307cb1"}


def official_m2f_head_filename(backbone_name: str, weights: SegmentorWeights = SegmentorWeights.ADE20K) -> str:
    return f"{backbone_name}_{weights.value.lower()}_m2f_head-{M2F_HEAD_HASHES[backbone_name]}.pth"


def _head_location(backbone_name: str, weights, official: bool) -> str:
    """Head checkpoint location; `official`: whether `SegmentorWeights` names a released file."""
    if weights is None:
        raise ValueError(f"{backbone_name} segmentor: pretrained=True needs weights=<path to the head checkpoint>")
    if isinstance(weights, str) and weights.upper() in SegmentorWeights.__members__:
        weights = SegmentorWeights[weights.upper()]
    if isinstance(weights, SegmentorWeights) and not official:
        raise ValueError(
            f"{backbone_name} segmentor: there is no released {weights.value} head for it; pass weights=<path>"
        )
    if isinstance(weights, SegmentorWeights):
        filename = official_m2f_head_filename(backbone_name, weights)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not cached.exists():
            raise CheckpointError(
                f"{cached}: the official {weights.value} Mask2Former head of {backbone_name} was not found; dinoseg "
                f"never downloads implicitly: download it from Meta (e.g. {DINOV3_BASE_URL}/{backbone_name}/"
                f"{filename}) and pass weights=<path>, or pass the https URL explicitly"
            )
        return str(cached)
    return str(weights)


def load_segmentor_head(segmentor: FeatureDecoder, location: str, check_hash: bool = False) -> FeatureDecoder:
    """Strictly load a head checkpoint (every non-backbone key of the segmentor, official names) by assignment.

    The backbone keeps its current weights; a head file that also holds backbone weights is refused.
    """
    from ..eval.segmentation.checkpointer import load_head_state_dict

    state_dict = load_state_dict_file(location, check_hash=check_hash)
    load_head_state_dict(segmentor, state_dict, source=str(location), assign=True)
    left = [n for n, t in (*segmentor.named_parameters(), *segmentor.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{location}: tensors left uninitialised after loading: {', '.join(left[:5])}")
    return segmentor


def _build(
    backbone_name: str,
    *,
    pretrained: bool,
    head_location: str | None,
    backbone_weights,
    check_hash: bool,
    device,
    backbone_options: dict | None = None,
    **decoder_kwargs,
) -> FeatureDecoder:
    if pretrained:
        # Check the head file first: fail before spending minutes on a multi-GB backbone.
        head_location = str(resolve_weights_path(head_location, check_hash=check_hash))
        backbone = make_backbone(
            backbone_name, pretrained=True, weights=backbone_weights, check_hash=check_hash, **(backbone_options or {})
        )
        with torch.device("meta"):
            segmentor = build_segmentation_decoder(backbone, **decoder_kwargs)
        load_segmentor_head(segmentor, head_location)
        return segmentor.to(device) if device is not None else segmentor
    backbone = make_backbone(backbone_name, pretrained=False, device=device, **(backbone_options or {}))
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return build_segmentation_decoder(backbone, **decoder_kwargs)


def _make_dinov3_m2f_segmentor(
    backbone_name: str,
    *,
    pretrained: bool = True,
    weights: SegmentorWeights | str | None = SegmentorWeights.ADE20K,
    backbone_weights: Weights | str = Weights.LVD1689M,
    check_hash: bool = False,
    autocast_dtype: torch.dtype = torch.bfloat16,
    hidden_dim: int = 2048,
    num_classes: int = 150,
    device: torch.device | str | None = None,
    backbone_options: dict | None = None,
    **m2f_options,
) -> FeatureDecoder:
    head_location = _head_location(backbone_name, weights, official=backbone_name in M2F_HEAD_HASHES) if pretrained else None
    return _build(
        backbone_name,
        pretrained=pretrained,
        head_location=head_location,
        backbone_weights=backbone_weights,
        check_hash=check_hash,
        device=device,
        backbone_options=backbone_options,
        backbone_out_layers=BackboneLayersSet.FOUR_EVEN_INTERVALS,
        decoder_type="m2f",
        hidden_dim=hidden_dim,
        num_classes=num_classes,
        autocast_dtype=autocast_dtype,
        **m2f_options,
    )


def dinov3_vit7b16_ms(
    *,
    pretrained: bool = True,
    weights: SegmentorWeights | str = SegmentorWeights.ADE20K,
    backbone_weights: Weights | str = Weights.LVD1689M,
    check_hash: bool = False,
    autocast_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    **kwargs,
) -> FeatureDecoder:
    """The released DINOv3 ViT-7B/16 + ViT-Adapter + Mask2Former ADE20K segmentor (hidden 2048, 150 classes).

    Args:
        weights: the head checkpoint (``dinov3_vit7b16_ade20k_m2f_head-bf307cb1.pth``): a path, a ``file://``
            or ``https://`` URL, or ``SegmentorWeights.ADE20K`` to use the file in the torch hub cache.
        backbone_weights: the ViT-7B checkpoint, as for :func:`dinoseg.hub.dinov3_vit7b16`.
        autocast_dtype: mixed precision of the forward pass on the input's device (float32 disables it;
            the deformable attention and the pixel decoder always run in float32).
        pretrained: False builds random weights instead (``device="meta"`` allocates nothing).
        device: where the segmentor ends up.
        kwargs: ``hidden_dim``, ``num_classes`` and Mask2Former / adapter options (see ``build_m2f_modules``),
            and ``backbone_options`` (architecture overrides for ``make_backbone``), for other heads of the same
            architecture.

    ``segmentor.predict(x, rescale_to=(H, W))`` returns ``{"pred_logits", "pred_masks"}``; feed it to
    ``dinoseg.eval.segmentation.inference`` for class scores, sliding windows and TTA.
    """
    return _make_dinov3_m2f_segmentor(
        "dinov3_vit7b16",
        pretrained=pretrained,
        weights=weights,
        backbone_weights=backbone_weights,
        check_hash=check_hash,
        autocast_dtype=autocast_dtype,
        device=device,
        **kwargs,
    )


def _make_dinov3_linear_segmentor(
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
    backbone_options: dict | None = None,
) -> FeatureDecoder:
    head_location = _head_location(backbone_name, weights, official=False) if pretrained else None
    try:
        return _build(
            backbone_name,
            pretrained=pretrained,
            head_location=head_location,
            backbone_weights=backbone_weights,
            check_hash=check_hash,
            device=device,
            backbone_options=backbone_options,
            backbone_out_layers=backbone_out_layers,
            decoder_type="linear",
            num_classes=num_classes,
            use_cls_token=use_cls_token,
            autocast_dtype=autocast_dtype,
        )
    except CheckpointError as e:
        if "conv.weight" in str(e) or "batchnorm_layer" in str(e):
            raise CheckpointError(
                f"{e} (the head was trained on other backbone layers: set backbone_out_layers to LAST, FOUR_LAST "
                f"or FOUR_EVEN_INTERVALS and use_cls_token to match it)"
            ) from None
        raise


def _linear_hub_function(backbone_name: str):
    def fn(**kwargs) -> FeatureDecoder:
        return _make_dinov3_linear_segmentor(backbone_name, **kwargs)

    # help() and torch.hub.help show the real keyword arguments.
    signature = inspect.signature(_make_dinov3_linear_segmentor)
    fn.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    fn.__name__ = fn.__qualname__ = f"{backbone_name}_ade20k_linear"
    fn.__doc__ = (
        f"Linear ADE20K segmentor on the DINOv3 {ARCHS[backbone_name][0]} backbone. `weights`: a linear head "
        f"checkpoint with official keys (`segmentation_model.1.batchnorm_layer.*`, `segmentation_model.1.conv.*`) "
        f"trained on `backbone_out_layers` (default LAST); `backbone_weights` as for `{backbone_name}`. "
        f"`pretrained=False` builds random weights (`device='meta'` allocates nothing); `backbone_options` "
        f"overrides the backbone architecture (as `make_backbone` keywords)."
    )
    return fn


dinov3_vits16_ade20k_linear = _linear_hub_function("dinov3_vits16")
dinov3_vits16plus_ade20k_linear = _linear_hub_function("dinov3_vits16plus")
dinov3_vitb16_ade20k_linear = _linear_hub_function("dinov3_vitb16")
dinov3_vitl16_ade20k_linear = _linear_hub_function("dinov3_vitl16")
dinov3_vitl16plus_ade20k_linear = _linear_hub_function("dinov3_vitl16plus")
dinov3_vith16plus_ade20k_linear = _linear_hub_function("dinov3_vith16plus")
dinov3_vit7b16_ade20k_linear = _linear_hub_function("dinov3_vit7b16")

LINEAR_SEGMENTORS = {
    f.__name__: f
    for f in (
        dinov3_vits16_ade20k_linear,
        dinov3_vits16plus_ade20k_linear,
        dinov3_vitb16_ade20k_linear,
        dinov3_vitl16_ade20k_linear,
        dinov3_vitl16plus_ade20k_linear,
        dinov3_vith16plus_ade20k_linear,
        dinov3_vit7b16_ade20k_linear,
    )
}
