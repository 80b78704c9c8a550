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
        in_channels: channels of the four input levels (an int is used for all four).
        hidden_dim: width of the pixel decoder, mask features and transformer decoder.
        num_classes: classes; ``pred_logits`` has ``num_classes + 1`` columns, the last meaning "no object".
        num_queries, nheads, dim_feedforward, dec_layers: transformer decoder sizes.
        enc_layers, pixel_decoder_nheads: deformable pixel-decoder encoder sizes (it shares
            ``dim_feedforward``).

    Defaults are the official head's (100 queries, 16 heads, FFN 4096, 6 encoder and 9 decoder layers).
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        hidden_dim: int = 2048,
        num_classes: int = 150,
        num_queries: int = 100,
        nheads: int = 16,
        dim_feedforward: int = 4096,
        enc_layers: int = 6,
        dec_layers: int = 9,
        pixel_decoder_nheads: int = 16,
    ):
        super().__init__()
        in_channels = [in_channels] * 4 if isinstance(in_channels, int) else list(in_channels)
        self.num_classes = num_classes
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

    def predict(self, features: dict[str, torch.Tensor], rescale_to: Sequence[int] = (512, 512)) -> dict:
        """``{"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, *rescale_to]}`` (masks are logits)."""
        out = self.forward(features)
        masks = F.interpolate(out["pred_masks"], size=tuple(rescale_to), mode="bilinear", align_corners=False)
        return {"pred_logits": out["pred_logits"], "pred_masks": masks}
