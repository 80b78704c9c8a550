"""Plain-DETR's global decoder with box-relative position bias, decomposed on the axes (official names and
keys): the decoder of the released detector.

For each query, the bias of a feature-map position is an MLP of the distances, along x, from the position to the
left and right edges of the query's reference box (``cpb_mlp1``) plus an MLP of the distances along y to the top
and bottom edges (``cpb_mlp2``), one value per head; the two axes are summed, so the cost is (w + h) MLP calls per
query instead of w x h.
"""

import math

import torch
from torch import nn

from ..util.box_ops import box_xyxy_to_cxcywh, delta2bbox
from . import global_ape_decoder as ape
from .global_ape_decoder import PADDING_BIAS

RPE_TYPES = ("linear", "abs_log8")


class GlobalCrossAttention(ape.GlobalCrossAttention):
    """Global cross-attention plus the decomposed box-relative bias. Boxes are (cx, cy, w, h): in pixels with
    `reparam`, else normalised to the feature map (scaled here by its size x `feature_stride`). `rpe_type`:
    ``linear`` distances in pixels, or ``abs_log8`` (sign(d) log8(|d| + 1))."""

    def __init__(self, dim, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0, rpe_hidden_dim=512,
                 rpe_type="linear", feature_stride=16, reparam=False):
        if rpe_type not in RPE_TYPES:
            raise ValueError(f"decoder_rpe_type must be one of {list(RPE_TYPES)}, not {rpe_type!r}")
        nn.Module.__init__(self)  # the bias MLPs first: the official order of the state dict
        self.rpe_type = rpe_type
        self.feature_stride = feature_stride
        self.reparam = reparam
        self.cpb_mlp1 = self.build_cpb_mlp(2, rpe_hidden_dim, num_heads)
        self.cpb_mlp2 = self.build_cpb_mlp(2, rpe_hidden_dim, num_heads)
        self._build_attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)

    @staticmethod
    def build_cpb_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=True), nn.ReLU(inplace=True),
                             nn.Linear(hidden_dim, out_dim, bias=False))

    def _edge_distances(self, edges: torch.Tensor, n: int) -> torch.Tensor:
        """(B, Q, 1, 2) box edges along an axis -> (B, Q, n, 2) their offsets from the n cell centres."""
        centres = torch.linspace(0.5, n - 0.5, n, dtype=torch.float32, device=edges.device) * self.feature_stride
        delta = edges - centres[None, None, :, None]
        if self.rpe_type == "abs_log8":
            delta = torch.sign(delta) * torch.log2(delta.abs() + 1.0) / math.log2(8)
        return delta

    def forward(self, query, reference_points, k_input_flatten, v_input_flatten, input_spatial_shapes,
                input_padding_mask=None):
        if len(input_spatial_shapes) != 1:
            raise ValueError(f"the global decoder takes a single feature level, got {len(input_spatial_shapes)}")
        h, w = input_spatial_shapes[0]
        centre, size = reference_points[..., :2], reference_points[..., 2:]
        corners = torch.cat([centre - size / 2, centre + size / 2], dim=-1)  # (B, Q, 1, 4) x0 y0 x1 y1
        if not self.reparam:
            scale = torch.tensor([w, h, w, h], dtype=corners.dtype, device=corners.device) * self.feature_stride
            corners = corners * scale
        bias_x = self.cpb_mlp1(self._edge_distances(corners[..., 0::2], w))  # (B, Q, w, heads)
        bias_y = self.cpb_mlp2(self._edge_distances(corners[..., 1::2], h))  # (B, Q, h, heads)
        bias = (bias_x[:, :, None] + bias_y[:, :, :, None]).flatten(2, 3).permute(0, 3, 1, 2)  # (B, heads, Q, h w)
        if input_padding_mask is not None:
            bias = bias + input_padding_mask[:, None, None].to(bias.dtype) * PADDING_BIAS
        return self.attend(query, k_input_flatten, v_input_flatten, bias)


class GlobalDecoderLayer(ape.GlobalDecoderLayer):
    """The global decoder layer, its cross-attention biased by the query's reference box."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_heads=8, norm_type="post_norm",
                 rpe_hidden_dim=512, rpe_type="linear", feature_stride=16, reparam=False):
        self._rpe = dict(rpe_hidden_dim=rpe_hidden_dim, rpe_type=rpe_type, feature_stride=feature_stride, reparam=reparam)
        super().__init__(d_model, d_ffn, dropout, activation, n_heads, norm_type)

    def _make_cross_attention(self, d_model, n_heads):
        return GlobalCrossAttention(d_model, n_heads, **self._rpe)

    def forward(self, tgt, query_pos, reference_points, src, src_pos_embed, src_spatial_shapes, src_padding_mask=None,
                self_attn_mask=None):
        keys = self.with_pos_embed(src, src_pos_embed)

        def cross(x):
            return self.cross_attn(self.with_pos_embed(x, query_pos), reference_points, keys, src, src_spatial_shapes,
                                   src_padding_mask)

        return self._run(tgt, query_pos, self_attn_mask, cross)


class GlobalDecoder(ape.GlobalDecoder):
    """The global decoder whose layers see the reference boxes; with `reparam` the boxes are absolute (pixels)
    and the box heads predict deltas (`delta2bbox`, clipped to each image's valid size `max_shape`)."""

    def __init__(self, decoder_layer, num_layers, return_intermediate=False, look_forward_twice=False,
                 use_checkpoint=False, d_model=256, norm_type="post_norm", reparam=False):
        super().__init__(decoder_layer, num_layers, return_intermediate, look_forward_twice, use_checkpoint, d_model,
                         norm_type)
        self.reparam = reparam

    def _layer_args(self, reference_points, src, src_pos_embed, src_spatial_shapes, src_valid_ratios, query_pos,
                    src_padding_mask, self_attn_mask):
        if self.reparam:
            boxes = reference_points[:, :, None]
        elif reference_points.shape[-1] == 4:
            # Normalised to the unpadded image -> normalised to the padded feature map.
            boxes = reference_points[:, :, None] * torch.cat([src_valid_ratios, src_valid_ratios], -1)[:, None]
        else:
            boxes = reference_points[:, :, None] * src_valid_ratios[:, None]
        return query_pos, boxes, src, src_pos_embed, src_spatial_shapes, src_padding_mask, self_attn_mask

    def _refine(self, reference_points, delta, max_shape):
        if not self.reparam:
            return super()._refine(reference_points, delta, max_shape)
        if reference_points.shape[-1] != 4:
            raise ValueError("reparameterised boxes need 4-d reference boxes (two-stage proposals)")
        return box_xyxy_to_cxcywh(delta2bbox(reference_points, delta, max_shape))


def build_global_rpe_decomp_decoder(args) -> GlobalDecoder:
    layer = GlobalDecoderLayer(d_model=args.hidden_dim, d_ffn=args.dim_feedforward, dropout=args.dropout,
                               activation="relu", n_heads=args.nheads, norm_type=args.norm_type,
                               rpe_hidden_dim=args.decoder_rpe_hidden_dim, rpe_type=args.decoder_rpe_type,
                               feature_stride=args.proposal_in_stride, reparam=args.reparam)
    return GlobalDecoder(layer, num_layers=args.dec_layers, return_intermediate=True,
                         look_forward_twice=args.look_forward_twice, use_checkpoint=args.decoder_use_checkpoint,
                         d_model=args.hidden_dim, norm_type=args.norm_type, reparam=args.reparam)
