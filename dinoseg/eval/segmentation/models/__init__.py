"""Full segmentors: a frozen backbone side plus a decoder head, with the official state-dict layout."""

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from enum import Enum

import torch
from torch import nn

from dinoseg.eval.utils import BackboneLayersSet, ModelWithIntermediateLayers, get_backbone_out_indices
from dinoseg.models.checkpoint import CheckpointError, load_head_state_dict, load_state_dict_file
from dinoseg.models.precision import HALF_DTYPES, cast_weights, float32_names, storage_dtype, weights_autocast

from .heads.linear_head import LinearHead
from .m2f import AdapterOptions, Mask2FormerOptions, build_m2f_modules

__all__ = [
    "AdapterOptions",
    "BackboneLayersSet",
    "DecoderType",
    "FeatureDecoder",
    "LinearHead",
    "Mask2FormerOptions",
    "build_segmentation_decoder",
    "build_segmentor_with_head",
]


class DecoderType(str, Enum):
    """Segmentation heads; a `str` so that the official string arguments ("linear", "m2f") compare equal."""

    LINEAR = "linear"
    M2F = "m2f"  # ViT-Adapter + Mask2Former


class FeatureDecoder(nn.Module):
    """`segmentation_model = ModuleList([backbone_side, head])`, so keys read `segmentation_model.{0,1}.*`.

    Mixed precision: `autocast_ctx` (official argument) is a callable returning the context every forward and
    predict runs in, e.g. `functools.partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)`.
    Without it, `autocast_dtype` is used on the input's device (float32: off), so the same module works on CPU and
    CUDA; that is what `build_segmentation_decoder` builds.
    """

    def __init__(self, segmentation_model: nn.ModuleList, autocast_ctx: Callable[[], ContextManager] | None = None, *,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__()
        if len(segmentation_model) != 2:
            raise ValueError(
                f"FeatureDecoder: expected [backbone_side, head], got {len(segmentation_model)} modules"
            )
        if autocast_ctx is not None and autocast_dtype is not None:
            raise ValueError("FeatureDecoder: pass autocast_ctx or autocast_dtype, not both")
        self.segmentation_model = segmentation_model
        self.autocast_ctx = autocast_ctx
        self.autocast_dtype = torch.float32 if autocast_dtype is None else autocast_dtype

    def _autocast(self, x: torch.Tensor) -> ContextManager:
        if self.autocast_ctx is not None:
            return self.autocast_ctx()
        # Half weights (stored with `cast_weights`, or the whole segmentor cast with `.to`) imply autocast in
        # their dtype, so float32 inputs and the float32 parts (norms, pixel decoder) work with them.
        return weights_autocast(self, x.device.type, self.autocast_dtype)

    def forward(self, x: torch.Tensor):
        """Training outputs of the head (linear: logits on the patch grid; m2f: the head's training dict)."""
        with self._autocast(x):
            return self.segmentation_model[1](self.segmentation_model[0](x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, rescale_to=(512, 512)):
        """Inference outputs resized to `rescale_to` (linear: logits; m2f: `pred_logits` / `pred_masks` dict)."""
        with self._autocast(x):
            features = self.segmentation_model[0](x)
            return self.segmentation_model[1].predict(features, rescale_to=tuple(rescale_to))


def _layer_set(value: BackboneLayersSet | str) -> BackboneLayersSet:
    if isinstance(value, BackboneLayersSet):
        return value
    try:
        return BackboneLayersSet(str(value).upper())
    except ValueError:
        choices = [m.value for m in BackboneLayersSet]
        raise ValueError(f"unknown backbone_out_layers {value!r}; expected one of {choices}") from None


def _decoder_type(value: DecoderType | str) -> DecoderType:
    try:
        return DecoderType(value)
    except ValueError:
        raise ValueError(f"unknown decoder_type {value!r}; expected one of {[t.value for t in DecoderType]}") from None


def build_segmentation_decoder(
    backbone_model: nn.Module,
    backbone_out_layers: BackboneLayersSet | str = BackboneLayersSet.FOUR_EVEN_INTERVALS,
    decoder_type: DecoderType | str = DecoderType.LINEAR,
    hidden_dim: int = 2048,
    num_classes: int = 150,
    dropout: float = 0.1,
    autocast_dtype: torch.dtype = torch.float32,
    *,
    use_batchnorm: bool = True,
    use_cls_token: bool = False,
    m2f_options: Mask2FormerOptions | None = None,
) -> FeatureDecoder:
    """Segmentor on a (frozen) DINOv3 backbone, with the official positional order and defaults.

    A ConvNeXt's four stages are its four "blocks". `decoder_type` "linear" uses `dropout`, `use_batchnorm`,
    `use_cls_token`; "m2f" (ViT-Adapter + Mask2Former; on a ConvNeXt, its four stages + Mask2Former)
    uses `hidden_dim` and `m2f_options` (default: the official head). Arguments of the other head are ignored,
    as in the official code, so that one config can drive both.
    """
    layers = _layer_set(backbone_out_layers)
    kind = _decoder_type(decoder_type)
    n_blocks = getattr(backbone_model, "n_blocks", None)
    if n_blocks is None:
        raise ValueError(f"backbone {type(backbone_model).__name__} has no `n_blocks` attribute")
    out_indices = get_backbone_out_indices(n_blocks, layers)

    if kind is DecoderType.M2F:
        backbone_side, head = build_m2f_modules(
            backbone_model, interaction_indexes=out_indices, hidden_dim=hidden_dim, num_classes=num_classes,
            options=m2f_options,
        )
    else:
        # Autocast is handled once by FeatureDecoder (on the input's device), so the backbone side adds none.
        backbone_side = ModelWithIntermediateLayers(
            backbone_model,
            n=out_indices,
            autocast_ctx=contextlib.nullcontext,
            reshape=True,
            return_class_token=use_cls_token,
        )
        # A hierarchical backbone (ConvNeXt) gives each stage its own width; the official code assumes the last
        # one for all and fails on every released ConvNeXt.
        widths = getattr(backbone_model, "embed_dims", None)
        head = LinearHead(
            in_channels=[widths[i] for i in out_indices] if widths else [backbone_model.embed_dim] * len(out_indices),
            n_output_channels=num_classes,
            use_batchnorm=use_batchnorm,
            use_cls_token=use_cls_token,
            dropout=dropout,
        )
    return FeatureDecoder(nn.ModuleList([backbone_side, head]), autocast_dtype=autocast_dtype)


def build_segmentor_with_head(backbone_model: nn.Module, head: dict | str, source: str, *,
                              dtype: torch.dtype | None = None, **decoder_args) -> FeatureDecoder:
    """`build_segmentation_decoder(backbone_model, **decoder_args)` with its head taken (strictly) from `head`, a
    state dict or a checkpoint path: the head is built on the meta device and the checkpoint tensors are
    assigned, so its memory is spent once. `dtype` (bfloat16 / float16) stores the head in half precision
    (the float32 parts stay float32), converting a checkpoint tensor by tensor as it is read. `source` names the
    checkpoint in errors."""
    with torch.device("meta"):
        segmentor = build_segmentation_decoder(backbone_model, **decoder_args)
    if not isinstance(head, dict):
        dtype_of = None
        if dtype in HALF_DTYPES:
            dtype_of = functools.partial(storage_dtype, dtype=dtype, keep=float32_names(segmentor))
        head = load_state_dict_file(head, dtype_of=dtype_of)
    load_head_state_dict(segmentor, head, source=source, assign=True)
    left = [n for n, t in (*segmentor.named_parameters(), *segmentor.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: tensors left uninitialised after loading: {', '.join(left[:5])}")
    return cast_weights(segmentor, dtype) if dtype is not None else segmentor
