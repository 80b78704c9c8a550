"""Mask2Former pixel decoder: a deformable-attention encoder over three feature levels plus one FPN level.

Feature names and order follow the official DINOv3 head: the inputs are ``{"1": stride 4, "2": stride 8,
"3": stride 16, "4": stride 32}``; levels "4", "3", "2" (coarse to fine) go through 1x1 projections +
GroupNorm and the deformable encoder; level "1" is merged FPN-style (lateral 1x1 conv + bilinearly upsampled
stride-8 output, then a 3x3 conv) to give the stride-4 mask features.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .....layers.deterministic import resize_bilinear
from .....models.precision import autocast_region
from ..utils.ms_deform_attn import MSDeformAttn
from ..utils.position_encoding import PositionEmbeddingSine

ENCODER_FEATURES = ("4", "3", "2")  # coarse to fine, as the encoder levels
FPN_FEATURE = "1"


class ConvNorm(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional ``norm`` submodule and activation (keys ``weight``, ``norm.*``)."""

    def __init__(self, *args, norm: nn.Module | None = None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def c2_xavier_fill(module: nn.Conv2d) -> None:
    """Caffe2 "XavierFill" (= kaiming uniform with a=1), zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention over all levels, then a ReLU FFN."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask=None):
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, None, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnTransformerEncoder(nn.Module):
    def __init__(self, layers: Sequence[MSDeformAttnTransformerEncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def get_reference_points(spatial_shapes, device=None) -> torch.Tensor:
        """Pixel centres of every level, normalised (x, y), shared by all levels: ``[1, S, levels, 2]``."""
        points = []
        for h, w in spatial_shapes:
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            y, x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack((x.reshape(-1), y.reshape(-1)), -1))
        return torch.cat(points, 0)[None, :, None].expand(-1, -1, len(spatial_shapes), -1)

    def forward(self, src, spatial_shapes, pos, padding_mask=None):
        reference_points = self.get_reference_points(spatial_shapes, device=src.device)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens the levels, adds the learned level encodings to the sine positions, runs the encoder."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.encoder = MSDeformAttnTransformerEncoder(
            [
                MSDeformAttnTransformerEncoderLayer(
                    d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points
                )
                for _ in range(num_encoder_layers)
            ]
        )
        self.level_encoding = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self.level_encoding.device.type == "meta":
            return
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_encoding)

    def forward(self, srcs: Sequence[torch.Tensor], pos_embeds: Sequence[torch.Tensor]):
        """Returns the encoded tokens ``[B, S, C]`` and the per-level ``(H, W)`` list."""
        spatial_shapes = [tuple(s.shape[-2:]) for s in srcs]
        src_flatten = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flatten = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_encoding[lvl].view(1, 1, -1) for lvl, p in enumerate(pos_embeds)],
            1,
        )
        # No padding: inputs are whole images or crops, so no padding mask (the official one is all False).
        memory = self.encoder(src_flatten, spatial_shapes, pos_flatten)
        return memory, spatial_shapes


class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder of the official DINOv3 Mask2Former head.

    Args:
        in_channels: channels of the features "1".."4" (strides 4, 8, 16, 32).
        conv_dim: width of the encoder and FPN.
        mask_dim: channels of the mask features.
        transformer_nheads, transformer_dim_feedforward, transformer_enc_layers, transformer_dropout:
            the deformable encoder.
        enc_n_points: sampling points per head and level.
        num_groups: GroupNorm groups.

    ``forward_features(features)`` returns ``(mask_features [B, mask_dim, H/4, W/4], encoder output at stride
    32, [stride-32, stride-16, stride-8 features])``, the last list being the decoder's memory levels.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        conv_dim: int,
        mask_dim: int,
        transformer_nheads: int = 16,
        transformer_dim_feedforward: int = 4096,
        transformer_enc_layers: int = 6,
        transformer_dropout: float = 0.0,
        enc_n_points: int = 4,
        num_groups: int = 32,
    ):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"MSDeformAttnPixelDecoder expects 4 input levels (strides 4..32), got {in_channels}")
        if conv_dim % num_groups != 0:
            raise ValueError(f"conv_dim {conv_dim} must be divisible by the GroupNorm groups {num_groups}")
        channels = dict(zip(("1", "2", "3", "4"), in_channels))
        self.num_feature_levels = len(ENCODER_FEATURES)
        self.input_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels[f], conv_dim, kernel_size=1), nn.GroupNorm(num_groups, conv_dim))
            for f in ENCODER_FEATURES
        )
        self.encoder = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=self.num_feature_levels,
            enc_n_points=enc_n_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_dim = mask_dim
        self.mask_feature = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        # One FPN level (stride 4), with GroupNorm and hence no conv bias.
        self.lateral_convs = nn.ModuleList(
            [ConvNorm(channels[FPN_FEATURE], conv_dim, kernel_size=1, bias=False, norm=nn.GroupNorm(num_groups, conv_dim))]
        )
        self.output_convs = nn.ModuleList(
            [
                ConvNorm(
                    conv_dim,
                    conv_dim,
                    kernel_size=3,
                    padding=1,
                    bias=False,
                    norm=nn.GroupNorm(num_groups, conv_dim),
                    activation=F.relu,
                )
            ]
        )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self.mask_feature.weight.device.type == "meta":
            return
        for proj in self.input_convs:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        for conv in (self.mask_feature, *self.lateral_convs, *self.output_convs):
            c2_xavier_fill(conv)

    def forward_features(self, features: dict[str, torch.Tensor]):
        missing = [f for f in (FPN_FEATURE,) + ENCODER_FEATURES if f not in features]
        if missing:
            raise KeyError(f"pixel decoder: missing input features {missing} (got {sorted(features)})")
        device_type = features[FPN_FEATURE].device.type
        # Official behaviour: the whole pixel decoder runs in float32, outside autocast. With its weights stored in
        # half precision (`dinoseg.models.precision`) it runs under autocast in that dtype instead: products in
        # half precision, normalisations and the deformable sampling in float32.
        dtype = self.mask_feature.weight.dtype
        half = dtype in (torch.float16, torch.bfloat16)
        with autocast_region(device_type, dtype if half else torch.float32, enabled=half):
            srcs, pos = [], []
            for conv, f in zip(self.input_convs, ENCODER_FEATURES):
                x = features[f] if half else features[f].to(dtype)
                srcs.append(conv(x))
                pos.append(self.pe_layer(x).to(x.dtype))
            memory, spatial_shapes = self.encoder(srcs, pos)
            B = memory.shape[0]
            out = [
                t.transpose(1, 2).reshape(B, -1, h, w)
                for t, (h, w) in zip(memory.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes)
            ]
            lateral = self.lateral_convs[0](features[FPN_FEATURE] if half else features[FPN_FEATURE].to(dtype))
            # FPN merge with the finest encoder level (stride 8), bilinear like the official code
            top_down = resize_bilinear(out[-1], lateral.shape[-2:])
            # In place where that gives the same result: the stride-4 map is large (392 MiB in float32 for the 7B).
            y = lateral.add_(top_down) if lateral.dtype == torch.promote_types(lateral.dtype, top_down.dtype) else (
                lateral + top_down)
            del lateral, top_down
            out.append(self.output_convs[0](y))
            del y
            multi_scale_features = out[: self.num_feature_levels]
            return self.mask_feature(out[-1]), out[0], multi_scale_features

