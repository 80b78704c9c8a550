"""Plain-DETR's global decoder with absolute position embeddings only (official names and keys): every query
attends to every position of the single-scale feature map; no relative position bias.

`global_rpe_decomp_decoder` builds on these classes, adding the box-relative position bias of the released
detector.
"""

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from torch import nn

from ..util.misc import _get_activation_fn, _get_clones, inverse_sigmoid

PADDING_BIAS = -100.0  # added to the attention logits of padded positions (official: not -inf)


class GlobalCrossAttention(nn.Module):
    """Multi-head attention of the queries on the flattened feature map (keys ``q``, ``k``, ``v``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self._build_attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)

    def _build_attention(self, dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop):
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def attend(self, query: torch.Tensor, k_input_flatten: torch.Tensor, v_input_flatten: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """Attention with `bias` (broadcasting to B, heads, queries, positions) added to the logits."""
        q, k, v = self._heads(self.q(query)), self._heads(self.k(k_input_flatten)), self._heads(self.v(v_input_flatten))
        if bias is not None:
            bias = bias.to(q.dtype).contiguous()  # contiguous: lets SDPA pick its efficient kernel
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0,
                                           scale=self.scale)
        B, N, C = query.shape
        # An explicit copy, not reshape: torch.export records reshape as a view of the fused kernel's output layout,
        # which the decomposed attention of an ONNX export does not have.
        x = x.transpose(1, 2).clone(memory_format=torch.contiguous_format)
        return self.proj_drop(self.proj(x.view(B, N, C)))

    def forward(self, query, k_input_flatten, v_input_flatten, input_padding_mask=None):
        bias = None
        if input_padding_mask is not None:
            bias = input_padding_mask[:, None, None].to(query.dtype) * PADDING_BIAS
        return self.attend(query, k_input_flatten, v_input_flatten, bias)


class GlobalDecoderLayer(nn.Module):
    """Self-attention of the queries, global cross-attention, feed-forward; ``pre_norm`` or ``post_norm``.
    Keys: ``self_attn`` / ``norm2``, ``cross_attn`` / ``norm1``, ``linear1``, ``linear2`` / ``norm3``."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_heads: int = 8, norm_type: str = "post_norm"):
        super().__init__()
        if norm_type not in ("pre_norm", "post_norm"):
            raise ValueError(f"norm_type must be 'pre_norm' or 'post_norm', not {norm_type!r}")
        self.norm_type = norm_type
        self.cross_attn = self._make_cross_attention(d_model, n_heads)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _get_activation_fn(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def _make_cross_attention(self, d_model: int, n_heads: int) -> nn.Module:
        return GlobalCrossAttention(d_model, n_heads)

    @staticmethod
    def with_pos_embed(tensor, pos):
        return tensor if pos is None else tensor + pos

    def _self_attention(self, x, query_pos, self_attn_mask):
        q = k = self.with_pos_embed(x, query_pos)
        # nn.MultiheadAttention here is sequence-first (official keys and layout).
        out = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), x.transpose(0, 1), attn_mask=self_attn_mask,
                             need_weights=False)[0]
        return out.transpose(0, 1)

    def _feed_forward(self, x):
        return self.linear2(self.dropout3(self.activation(self.linear1(x))))

    def _run(self, tgt, query_pos, self_attn_mask, cross):
        """The layer, with `cross(x)` the cross-attention of the (normalised) queries `x`."""
        if self.norm_type == "pre_norm":
            tgt = tgt + self.dropout2(self._self_attention(self.norm2(tgt), query_pos, self_attn_mask))
            tgt = tgt + self.dropout1(cross(self.norm1(tgt)))
            return tgt + self.dropout4(self._feed_forward(self.norm3(tgt)))
        tgt = self.norm2(tgt + self.dropout2(self._self_attention(tgt, query_pos, self_attn_mask)))
        tgt = self.norm1(tgt + self.dropout1(cross(tgt)))
        return self.norm3(tgt + self.dropout4(self._feed_forward(tgt)))

    def _cross(self, query_pos, src, src_pos_embed, src_padding_mask):
        keys = self.with_pos_embed(src, src_pos_embed)
        return lambda x: self.cross_attn(self.with_pos_embed(x, query_pos), keys, src, src_padding_mask)

    def forward(self, tgt, query_pos, src, src_pos_embed, src_padding_mask=None, self_attn_mask=None):
        return self._run(tgt, query_pos, self_attn_mask, self._cross(query_pos, src, src_pos_embed, src_padding_mask))


class GlobalDecoder(nn.Module):
    """`num_layers` decoder layers with iterative box refinement: after each layer, ``bbox_embed[layer]`` (set by
    the detector, like ``class_embed``) moves the reference boxes; they are detached before the next layer.
    Returns the (final-normed) outputs of every layer and the reference boxes each layer's prediction starts from:
    with `look_forward_twice` the refined boxes before detaching, so that a layer's loss also trains the previous
    layer's box head."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int, return_intermediate: bool = False,
                 look_forward_twice: bool = False, use_checkpoint: bool = False, d_model: int = 256,
                 norm_type: str = "post_norm"):
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        self.look_forward_twice = look_forward_twice
        self.use_checkpoint = use_checkpoint
        self.bbox_embed = None  # set by the detector (iterative box refinement)
        self.class_embed = None  # set by the detector (two-stage proposals)
        self.norm_type = norm_type
        self.final_layer_norm = nn.LayerNorm(d_model) if norm_type == "pre_norm" else None

    def _reset_parameters(self):
        def init(m):
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.bias, 0)
                nn.init.constant_(m.weight, 1.0)

        self.apply(init)

    def _layer_args(self, reference_points, src, src_pos_embed, src_spatial_shapes, src_valid_ratios, query_pos,
                    src_padding_mask, self_attn_mask) -> tuple:
        """The arguments of a layer after the queries (this decoder's layers do not use the reference boxes)."""
        return query_pos, src, src_pos_embed, src_padding_mask, self_attn_mask

    def _refine(self, reference_points, delta, max_shape):
        """Reference boxes moved by the box head's output `delta` (logit space: boxes are normalised)."""
        if reference_points.shape[-1] == 4:
            return (delta + inverse_sigmoid(reference_points)).sigmoid()
        # Points: the head's first two outputs move the centre, the size comes from the head alone.
        return torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], dim=-1).sigmoid()

    def forward(self, tgt, reference_points, src, src_pos_embed, src_spatial_shapes, src_level_start_index,
                src_valid_ratios, query_pos=None, src_padding_mask=None, self_attn_mask=None, max_shape=None):
        output = tgt
        intermediate, intermediate_reference_points = [], []
        for lid, layer in enumerate(self.layers):
            args = self._layer_args(reference_points, src, src_pos_embed, src_spatial_shapes, src_valid_ratios,
                                    query_pos, src_padding_mask, self_attn_mask)
            if self.use_checkpoint and torch.is_grad_enabled():
                output = checkpoint.checkpoint(layer, output, *args, use_reentrant=False)
            else:
                output = layer(output, *args)
            normed = self.final_layer_norm(output) if self.final_layer_norm is not None else output
            refined = reference_points
            if self.bbox_embed is not None:
                refined = self._refine(reference_points, self.bbox_embed[lid](normed), max_shape)
                reference_points = refined.detach()
            if self.return_intermediate:
                intermediate.append(normed)
                intermediate_reference_points.append(refined if self.look_forward_twice else reference_points)
        if self.return_intermediate:
            return torch.stack(intermediate), torch.stack(intermediate_reference_points)
        return normed, reference_points


def build_global_ape_decoder(args) -> GlobalDecoder:
    layer = GlobalDecoderLayer(d_model=args.hidden_dim, d_ffn=args.dim_feedforward, dropout=args.dropout,
                               activation="relu", n_heads=args.nheads, norm_type=args.norm_type)
    return GlobalDecoder(layer, num_layers=args.dec_layers, return_intermediate=True,
                         look_forward_twice=args.look_forward_twice, use_checkpoint=args.decoder_use_checkpoint,
                         d_model=args.hidden_dim, norm_type=args.norm_type)
