"""The detector's transformer (official names and keys): an optional DETR encoder over the projected feature map,
two-stage proposals from the encoder's output (`gen_encoder_output_proposals`, ranked by a class head, the top
ones becoming the decoder's reference boxes), and the global decoder.

`Transformer` works with boxes normalised to [0, 1] (predicted in logit space); `TransformerReParam` with boxes
in absolute pixels and box deltas (`delta2bbox`), as the released detector does.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..util.box_ops import box_xyxy_to_cxcywh, delta2bbox
from .global_ape_decoder import build_global_ape_decoder
from .global_rpe_decomp_decoder import build_global_rpe_decomp_decoder
from .transformer_encoder import TransformerEncoder, TransformerEncoderLayer
from .utils import LayerNorm2D

DECODERS = {"global_ape": build_global_ape_decoder, "global_rpe_decomp": build_global_rpe_decomp_decoder}


def _resampler(d_model: int, in_stride: int, out_stride: int) -> nn.Module:
    """Feature map at `in_stride` -> `out_stride`: 2x2 stride-2 (transposed) convolutions, LayerNorm + GELU between."""
    if out_stride == in_stride:
        return nn.Identity()
    ratio = out_stride / in_stride if out_stride > in_stride else in_stride / out_stride
    steps = round(math.log2(ratio))
    if 2**steps != ratio:
        raise ValueError(f"proposal stride {out_stride} is not a power-of-two multiple or fraction of {in_stride}")
    conv = nn.Conv2d if out_stride > in_stride else nn.ConvTranspose2d
    layers = []
    for _ in range(steps - 1):
        layers += [conv(d_model, d_model, kernel_size=2, stride=2), LayerNorm2D(d_model), nn.GELU()]
    layers.append(conv(d_model, d_model, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class Transformer(nn.Module):
    """Encoder, two-stage proposals (or learned reference points) and decoder.

    `args` (a `DetectionHeadConfig`) configures the decoder, as in the official code. `build_transformer` gives
    the encoder only its number of layers (and, in dinoseg, its dropout): as officially, it is post-norm whatever
    `norm_type` says and its feed-forward width is `dim_feedforward`'s default, 2048.
    """

    def __init__(self, d_model=256, nhead=8, num_feature_levels=4, two_stage=False, two_stage_num_proposals=300,
                 mixed_selection=False, norm_type="post_norm", decoder_type="deform", proposal_feature_levels=1,
                 proposal_in_stride=16, proposal_tgt_strides=(8, 16, 32, 64), proposal_min_size=50, args=None,
                 add_transformer_encoder=False, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False, num_encoder_layers=6):
        super().__init__()
        if norm_type not in ("pre_norm", "post_norm"):
            raise ValueError(f"norm_type must be 'pre_norm' or 'post_norm', not {norm_type!r}")
        if decoder_type not in DECODERS:
            raise ValueError(f"decoder_type must be one of {sorted(DECODERS)}, not {decoder_type!r}")
        if args is None:
            raise ValueError("Transformer needs `args` (a DetectionHeadConfig) to build its decoder")
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.decoder = DECODERS[decoder_type](args)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.mixed_selection = mixed_selection
        self.proposal_feature_levels = proposal_feature_levels
        self.proposal_tgt_strides = list(proposal_tgt_strides) if proposal_tgt_strides is not None else None
        self.proposal_min_size = proposal_min_size
        if two_stage and proposal_feature_levels > 1:
            if self.proposal_tgt_strides is None or len(self.proposal_tgt_strides) != proposal_feature_levels:
                raise ValueError(f"proposal_tgt_strides ({proposal_tgt_strides}) must give one stride per proposal "
                                 f"level (proposal_feature_levels={proposal_feature_levels})")
            self.proposal_in_stride = proposal_in_stride
            self.enc_output_proj = nn.ModuleList(
                [_resampler(d_model, proposal_in_stride, s) for s in self.proposal_tgt_strides])
        self.encoder = None
        if add_transformer_encoder:
            layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
            self.encoder = TransformerEncoder(layer, num_encoder_layers, nn.LayerNorm(d_model) if normalize_before else None)
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)
        if hasattr(self.decoder, "_reset_parameters"):
            self.decoder._reset_parameters()

    def get_proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """(N, L, 4) boxes -> (N, L, 4 x d_model / 2) sine embeddings (2 pi x coordinate, interleaved sin / cos)."""
        num_pos_feats = self.d_model // 2
        index = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = 10000 ** (2 * torch.div(index, 2, rounding_mode="floor") / num_pos_feats)
        angles = (proposals * (2 * math.pi))[..., None] / dim_t
        return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(2)

    def expand_encoder_output(self, memory, memory_padding_mask, spatial_shapes):
        """The single-level memory resampled to every proposal stride: flattened memories, masks and shapes."""
        if len(spatial_shapes) != 1:
            raise ValueError(f"proposal levels are built from one feature level, got {len(spatial_shapes)}")
        bs, _, c = memory.shape
        h, w = spatial_shapes[0]
        coarsest = max(self.proposal_tgt_strides) // self.proposal_in_stride
        if min(h, w) < coarsest:
            raise ValueError(f"a {h} x {w} feature map is too small for proposals at stride {max(self.proposal_tgt_strides)}: "
                             f"images need at least {coarsest * self.proposal_in_stride} px a side")
        grid = memory.view(bs, h, w, c).permute(0, 3, 1, 2)
        grid_mask = memory_padding_mask.view(bs, h, w)
        memories, masks, shapes = [], [], []
        for proj in self.enc_output_proj:
            mem = proj(grid)
            masks.append(F.interpolate(grid_mask[None].float(), size=mem.shape[-2:]).to(torch.bool)[0].flatten(1))
            memories.append(mem.flatten(2).transpose(1, 2))
            shapes.append(tuple(mem.shape[-2:]))
        return torch.cat(memories, dim=1), torch.cat(masks, dim=1), shapes

    @staticmethod
    def _cell_centres(h: int, w: int, n: int, device) -> torch.Tensor:
        """(n, h, w, 2) (x, y) indices of the cells of an h x w grid, plus 0.5."""
        ys, xs = torch.meshgrid(torch.linspace(0, h - 1, h, dtype=torch.float32, device=device),
                                torch.linspace(0, w - 1, w, dtype=torch.float32, device=device), indexing="ij")
        return torch.stack([xs, ys], dim=-1)[None].expand(n, -1, -1, -1) + 0.5

    def _proposal_memory(self, memory, padding, invalid):
        """The memory at the proposals, zero where padded or invalid, through `enc_output` and its norm."""
        memory = memory.masked_fill(padding.unsqueeze(-1), 0.0).masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(memory))

    def gen_encoder_output_proposals(self, memory, memory_padding_mask, spatial_shapes):
        """One proposal per cell of every proposal level: a box of size 0.05 x 2^level around the cell, normalised
        to the unpadded image, in logit space (inf where padded or not inside (0.01, 0.99)); and the memory there."""
        if self.proposal_feature_levels > 1:
            memory, memory_padding_mask, spatial_shapes = self.expand_encoder_output(
                memory, memory_padding_mask, spatial_shapes)
        n = memory.shape[0]
        proposals, start = [], 0
        for lvl, (h, w) in enumerate(spatial_shapes):
            mask = memory_padding_mask[:, start:start + h * w].view(n, h, w)
            valid_h, valid_w = (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
            scale = torch.stack([valid_w, valid_h], dim=-1).view(n, 1, 1, 2)
            centres = self._cell_centres(h, w, n, memory.device) / scale
            sizes = torch.ones_like(centres) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat([centres, sizes], dim=-1).view(n, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, dim=1)
        invalid = ~((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf")).masked_fill(invalid, float("inf"))
        return self._proposal_memory(memory, memory_padding_mask, invalid), proposals, None

    def get_valid_ratio(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, H, W) padding mask -> (B, 2) unpadded fraction of the width and of the height."""
        _, H, W = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        return torch.stack([valid_w.float() / W, valid_h.float() / H], -1)

    def _proposal_boxes(self, output_memory, output_proposals, max_shape):
        """(class logits, box deltas or None, boxes) of every proposal; boxes in logit space here."""
        enc_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
        enc_coord = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
        return enc_class, None, enc_coord

    def _as_reference(self, boxes):
        return boxes.sigmoid()

    def get_reference_points(self, memory, mask_flatten, spatial_shapes, *, num_proposals: int | None = None):
        """The `num_proposals` (default `two_stage_num_proposals`) proposals of highest first-class score become
        the decoder's reference boxes (detached)."""
        output_memory, output_proposals, max_shape = self.gen_encoder_output_proposals(memory, mask_flatten, spatial_shapes)
        enc_outputs_class, enc_outputs_delta, enc_outputs_coord_unact = self._proposal_boxes(
            output_memory, output_proposals, max_shape)
        topk = self.two_stage_num_proposals if num_proposals is None else num_proposals
        # Ranked by the logit of class 0 alone (official, from Deformable DETR's binary proposal classifier).
        top = torch.topk(enc_outputs_class[..., 0], topk, dim=1)[1]
        chosen = torch.gather(enc_outputs_coord_unact, 1, top.unsqueeze(-1).expand(-1, -1, 4)).detach()
        return (self._as_reference(chosen), max_shape, enc_outputs_class, enc_outputs_coord_unact, enc_outputs_delta,
                output_proposals)

    def forward(self, srcs, masks, pos_embeds, query_embed=None, self_attn_mask=None, *, num_proposals=None):
        """`srcs`, `masks`, `pos_embeds`: per feature level (B, C, H, W), (B, H, W), (B, C, H, W). `query_embed`:
        the queries' content (two-stage with mixed selection) or position + content (without two-stage).
        `num_proposals` (dinoseg): how many proposals become queries, `two_stage_num_proposals` by default.

        Returns (decoder outputs per layer, initial reference boxes, reference boxes per layer, proposal class
        logits, proposal boxes, proposal box deltas, proposals, per-image valid size); the last five are None
        without two-stage, the deltas None and the valid size None when not reparameterised."""
        src_flatten, mask_flatten, pos_flatten, spatial_shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            spatial_shapes.append(tuple(src.shape[-2:]))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_flatten.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        pos_flatten = torch.cat(pos_flatten, 1)
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)
        memory = src_flatten
        if self.encoder is not None:
            memory = self.encoder(src_flatten, src_key_padding_mask=mask_flatten, pos=pos_flatten)

        bs, _, c = memory.shape
        if self.two_stage:
            (reference_points, max_shape, enc_outputs_class, enc_outputs_coord_unact, enc_outputs_delta,
             output_proposals) = self.get_reference_points(memory, mask_flatten, spatial_shapes,
                                                           num_proposals=num_proposals)
            proposal_embed = self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(reference_points)))
            if self.mixed_selection:  # positions from the proposals, content learned
                query_pos = proposal_embed[..., :c]
                tgt = query_embed.unsqueeze(0).expand(bs, -1, -1)
            else:
                query_pos, tgt = torch.split(proposal_embed, c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
            tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
            max_shape = None
        init_reference = reference_points
        hs, inter_references = self.decoder(tgt, reference_points, memory, pos_flatten, spatial_shapes, None,
                                            valid_ratios, query_pos, mask_flatten, self_attn_mask, max_shape)
        if self.two_stage:
            return (hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact,
                    enc_outputs_delta, output_proposals, max_shape)
        return hs, init_reference, inter_references, None, None, None, None, None


class TransformerReParam(Transformer):
    """Boxes in absolute pixels: proposals of `proposal_min_size` x 2^level px at each cell centre, box heads
    predicting deltas (`delta2bbox`) clipped to each image's valid size."""

    def gen_encoder_output_proposals(self, memory, memory_padding_mask, spatial_shapes):
        """Proposals (cx, cy, w, h) in pixels (invalid or padded ones set to the feature map's extent), the memory
        there, and the valid (height, width) of each image in pixels, (B, 1, 1) each."""
        if self.proposal_feature_levels > 1:
            memory, memory_padding_mask, spatial_shapes = self.expand_encoder_output(
                memory, memory_padding_mask, spatial_shapes)
        n = memory.shape[0]
        proposals = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            centres = self._cell_centres(h, w, n, memory.device) * self.proposal_tgt_strides[lvl]
            sizes = torch.ones_like(centres) * self.proposal_min_size * (2.0**lvl)
            proposals.append(torch.cat([centres, sizes], dim=-1).view(n, -1, 4))
        proposals = torch.cat(proposals, dim=1)
        # The valid image size, from the first level's mask.
        h, w = spatial_shapes[0]
        stride = self.proposal_tgt_strides[0]
        mask = memory_padding_mask[:, : h * w].view(n, h, w)
        valid_h = (~mask[:, :, 0]).sum(1, keepdim=True) * stride
        valid_w = (~mask[:, 0, :]).sum(1, keepdim=True) * stride
        image_size = torch.cat([valid_w, valid_h, valid_w, valid_h], dim=-1).unsqueeze(1)  # (B, 1, 4)
        invalid = ~((proposals > 0.01 * image_size) & (proposals < 0.99 * image_size)).all(-1, keepdim=True)
        outside = max(h, w) * stride
        proposals = proposals.masked_fill(memory_padding_mask.unsqueeze(-1), outside).masked_fill(invalid, outside)
        max_shape = (valid_h[:, None, :], valid_w[:, None, :])
        return self._proposal_memory(memory, memory_padding_mask, invalid), proposals, max_shape

    def _proposal_boxes(self, output_memory, output_proposals, max_shape):
        enc_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
        enc_delta = self.decoder.bbox_embed[self.decoder.num_layers](output_memory)
        enc_coord = box_xyxy_to_cxcywh(delta2bbox(output_proposals, enc_delta, max_shape))
        return enc_class, enc_delta, enc_coord

    def _as_reference(self, boxes):
        return boxes


def build_transformer(args) -> Transformer:
    """The transformer of `args`. The encoder's dropout is `args.encoder_dropout` when set, else `args.dropout`
    (the official code passes neither, so its encoder drops at 0.1 in training whatever `dropout` says: set
    ``encoder_dropout=0.1`` to reproduce it)."""
    encoder_dropout = getattr(args, "encoder_dropout", None)
    model_class = TransformerReParam if args.reparam else Transformer
    return model_class(
        d_model=args.hidden_dim,
        nhead=args.nheads,
        num_feature_levels=args.num_feature_levels,
        two_stage=args.two_stage,
        two_stage_num_proposals=args.num_queries_one2one + args.num_queries_one2many,
        mixed_selection=args.mixed_selection,
        norm_type=args.norm_type,
        decoder_type=args.decoder_type,
        proposal_feature_levels=args.proposal_feature_levels,
        proposal_in_stride=args.proposal_in_stride,
        proposal_tgt_strides=args.proposal_tgt_strides,
        proposal_min_size=args.proposal_min_size,
        args=args,
        add_transformer_encoder=args.add_transformer_encoder,
        num_encoder_layers=args.num_encoder_layers,
        # The encoder's feed-forward width stays the default 2048 whatever `dim_feedforward` says (official: the
        # released weights have that shape); its dropout is the one departure (see above).
        dropout=args.dropout if encoder_dropout is None else encoder_dropout,
    )
