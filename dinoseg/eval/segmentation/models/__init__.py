"""Full segmentors: a frozen backbone side plus a decoder head, with the official state-dict layout."""

import contextlib

import torch
from torch import nn

from dinoseg.eval.utils import BackboneLayersSet, ModelWithIntermediateLayers, get_backbone_out_indices

from .heads.linear_head import LinearHead

__all__ = ["BackboneLayersSet", "FeatureDecoder", "LinearHead", "build_segmentation_decoder"]

DECODER_TYPES = ("linear", "m2f")


class FeatureDecoder(nn.Module):
    """`segmentation_model = ModuleList([backbone_side, head])`, so keys read `segmentation_model.{0,1}.*`.

    Mixed precision follows the input: autocast runs on `x.device.type` with `autocast_dtype`, and is off for
    float32, so the same module works on CPU and CUDA.
    """

    def __init__(self, segmentation_model: nn.ModuleList, autocast_dtype: torch.dtype = torch.float32):
        super().__init__()
        if len(segmentation_model) != 2:
            raise ValueError(
                f"FeatureDecoder: expected [backbone_side, head], got {len(segmentation_model)} modules"
            )
        self.segmentation_model = segmentation_model
        self.autocast_dtype = autocast_dtype

    def autocast_ctx(self, x: torch.Tensor):
        if self.autocast_dtype in (None, torch.float32):
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)

    def forward(self, x: torch.Tensor):
        """Training outputs of the head (linear: logits on the patch grid; m2f: the head's training dict)."""
        with self.autocast_ctx(x):
            return self.segmentation_model[1](self.segmentation_model[0](x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, rescale_to=(512, 512)):
        """Inference outputs resized to `rescale_to` (linear: logits; m2f: `pred_logits` / `pred_masks` dict)."""
        with self.autocast_ctx(x):
            features = self.segmentation_model[0](x)
            return self.segmentation_model[1].predict(features, rescale_to=tuple(rescale_to))


def build_segmentation_decoder(
    backbone_model: nn.Module,
    backbone_out_layers: BackboneLayersSet | str = BackboneLayersSet.FOUR_EVEN_INTERVALS,
    decoder_type: str = "m2f",
    hidden_dim: int = 2048,
    num_classes: int = 150,
    autocast_dtype: torch.dtype = torch.float32,
    dropout: float = 0.1,
    use_batchnorm: bool = True,
    use_cls_token: bool = False,
    **m2f_options,
) -> FeatureDecoder:
    """Segmentor on a (frozen) DINOv3 backbone; `decoder_type` is "linear" or "m2f" (ViT-Adapter + Mask2Former;
    on a ConvNeXt, its four stages + Mask2Former). A ConvNeXt's four stages are its four "blocks".

    `hidden_dim` and `m2f_options` only apply to "m2f" (options given to "linear" are an error); `dropout`,
    `use_batchnorm`, `use_cls_token` only to "linear" (ignored by "m2f", as in the official code, so one config
    can drive both).
    """
    if isinstance(backbone_out_layers, str):
        try:
            backbone_out_layers = BackboneLayersSet(backbone_out_layers.upper())
        except ValueError:
            choices = [m.value for m in BackboneLayersSet]
            raise ValueError(
                f"unknown backbone_out_layers {backbone_out_layers!r}; expected one of {choices}"
            ) from None
    if decoder_type not in DECODER_TYPES:
        raise ValueError(f"unknown decoder_type {decoder_type!r}; expected one of {list(DECODER_TYPES)}")
    n_blocks = getattr(backbone_model, "n_blocks", None)
    if n_blocks is None:
        raise ValueError(f"backbone {type(backbone_model).__name__} has no `n_blocks` attribute")
    out_indices = get_backbone_out_indices(n_blocks, backbone_out_layers)

    if decoder_type == "m2f":
        from .m2f import build_m2f_modules  # deferred: the Mask2Former code is only needed for this decoder

        backbone_side, head = build_m2f_modules(
            backbone_model,
            interaction_indexes=out_indices,
            hidden_dim=hidden_dim,
            num_classes=num_classes,
            **m2f_options,
        )
    else:
        if m2f_options:
            raise ValueError(f"options {sorted(m2f_options)} only apply to decoder_type 'm2f', not 'linear'")
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
