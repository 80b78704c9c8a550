"""Mask2Former segmentation head (pixel decoder + masked transformer decoder), official key names."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .mask2former_transformer_decoder import MultiScaleMaskedTransformerDecoder
from .pixel_decoder import MSDeformAttnPixelDecoder


class Mask2FormerHead(nn.Module):
    """Mask-classification head on the ViT-Adapter pyramid ``{"1".."4"}`` (strides 4, 8, 16, 32).

    Args:
        input_shape: the four input levels: the official ``{"1": [channels, height, width, stride], ...}`` (only
            the channels are read), their channels, or one channel count for all four.
        hidden_dim: width of the pixel decoder, mask features and transformer decoder.
        num_classes: classes; ``pred_logits`` has ``num_classes + 1`` columns, the last meaning "no object".
        loss_weight, ignore_value, transformer_in_feature: official arguments, kept as attributes (the official
            head does not use them either; training takes its loss settings from `Mask2FormerLoss`).
        num_queries, nheads, dim_feedforward, dec_layers: transformer decoder sizes.
        enc_layers, pixel_decoder_nheads: deformable pixel-decoder encoder sizes (it shares
            ``dim_feedforward``).

    Defaults are the official head's (100 queries, 16 heads, FFN 4096, 6 encoder and 9 decoder layers).
    """

    def __init__(
        self,
        input_shape: dict | int | Sequence[int],
        hidden_dim: int = 2048,
        num_classes: int = 150,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
        transformer_in_feature: str = "multi_scale_pixel_decoder",
        *,
        num_queries: int = 100,
        nheads: int = 16,
        dim_feedforward: int = 4096,
        enc_layers: int = 6,
        dec_layers: int = 9,
        pixel_decoder_nheads: int = 16,
    ):
        super().__init__()
        if isinstance(input_shape, dict):  # ShapeSpecs by level name, ordered by stride as officially
            in_channels = [spec[0] for _, spec in sorted(input_shape.items(), key=lambda item: item[1][-1])]
        else:
            in_channels = [input_shape] * 4 if isinstance(input_shape, int) else list(input_shape)
        if len(in_channels) != 4:
            raise ValueError(f"Mask2FormerHead: expected four input levels, got {len(in_channels)}")
        self.num_classes = num_classes
        self.loss_weight, self.ignore_value, self.transformer_in_feature = loss_weight, ignore_value, transformer_in_feature
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels,
            conv_dim=hidden_dim,
            mask_dim=hidden_dim,
            transformer_nheads=pixel_decoder_nheads,
            transformer_dim_feedforward=dim_feedforward,
            transformer_enc_layers=enc_layers,
            transformer_dropout=0.0,
        )
        self.predictor = MultiScaleMaskedTransformerDecoder(
            hidden_dim,
            num_classes=num_classes,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            nheads=nheads,
            dim_feedforward=dim_feedforward,
            dec_layers=dec_layers,
            pre_norm=False,
            mask_dim=hidden_dim,
            enforce_input_project=False,
        )

    def forward(self, features: dict[str, torch.Tensor], mask=None) -> dict:
        """Training outputs: ``pred_logits [B, Q, K+1]``, ``pred_masks [B, Q, H/4, W/4]``, ``aux_outputs``."""
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale_features, mask_features, mask)

    def predict(self, features: dict[str, torch.Tensor], mask=None, rescale_to: Sequence[int] = (512, 512)) -> dict:
        """``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, *rescale_to]}`` (masks are logits)."""
        out = self.forward(features, mask)
        masks = F.interpolate(out["pred_masks"], size=tuple(rescale_to), mode="bilinear", align_corners=False)
        return {"pred_logits": out["pred_logits"], "pred_masks": masks}
