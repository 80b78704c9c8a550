"""Plain-DETR on a frozen DINOv3 backbone (official names and keys): `PlainDETR` (normalised boxes),
`PlainDETRReParam` (absolute boxes and box deltas: the released COCO detector), `PostProcess` and `build_model`.

Hybrid matching: the first `num_queries_one2one` queries are trained with one-to-one matching and used at
inference, the `num_queries_one2many` others (training only) with one-to-many matching; an attention mask keeps
the two groups from seeing each other. In eval mode the detector runs its one-to-one queries only (the official
hub sets ``num_queries`` and ``transformer.two_stage_num_proposals`` to that by hand; doing so still works).
"""

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dinoseg.models.checkpoint import CheckpointError, load_head_state_dict
from dinoseg.models.precision import weights_autocast

from ..util import box_ops
from ..util.misc import NestedTensor, _get_clones, inverse_sigmoid, nested_tensor_from_tensor_list
from .backbone import build_backbone
from .position_encoding import PositionEncoding
from .transformer import DECODERS, build_transformer


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between (keys ``layers.<i>``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


def _as_nested_tensor(samples, multiple: int) -> NestedTensor:
    """A NestedTensor, a list of (3, H, W) images (padded to a batch) or a (B, 3, H, W) batch without padding,
    padded at the bottom and right to a multiple of `multiple` (the patch size; the padding is masked)."""
    if isinstance(samples, NestedTensor):
        images, mask = samples.tensors, samples.mask
    elif isinstance(samples, torch.Tensor) and samples.ndim == 4:
        images, mask = samples, None
    elif isinstance(samples, (list, tuple)) and samples and all(
            isinstance(s, torch.Tensor) and s.ndim == 3 for s in samples):
        images, mask = nested_tensor_from_tensor_list(list(samples)).decompose()
    else:
        raise TypeError("the detector takes a list of (3, H, W) image tensors, a (B, 3, H, W) tensor or a "
                        f"NestedTensor, not {type(samples).__name__}")
    if mask is None:
        mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool, device=images.device)
    pad_h, pad_w = -images.shape[-2] % multiple, -images.shape[-1] % multiple
    if pad_h or pad_w:
        # The official code leaves such sizes to the ViT, which drops the last partial row / column of patches.
        images = F.pad(images, (0, pad_w, 0, pad_h))
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=True)
    return NestedTensor(images, mask)


def _to_float32(outputs):
    if isinstance(outputs, dict):
        return {k: _to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_to_float32(v) for v in outputs]
    return outputs.float() if outputs.is_floating_point() else outputs


class PlainDETR(nn.Module):
    """Plain-DETR: backbone features, one input projection, the transformer, and per decoder layer a class head
    and a box head (`with_box_refine`: one per layer, also used by the decoder to refine its boxes; `two_stage`:
    one more pair, ``[-1]``, scoring the encoder's proposals).

    `forward(samples)` takes a list of normalised (3, H, W) images (padded into a batch), a (B, 3, H, W) tensor or
    a `NestedTensor`, and returns, with Q1 = one-to-one and Q2 = one-to-many queries (Q2 = 0 in eval mode):
      - ``pred_logits`` (B, Q1, classes) and ``pred_boxes`` (B, Q1, 4): the last layer's class logits and boxes
        (cx, cy, w, h, normalised to the unpadded image);
      - ``pred_logits_one2many``, ``pred_boxes_one2many``: the same for the one-to-many queries;
      - ``aux_outputs`` / ``aux_outputs_one2many`` (with `aux_loss`): a list of such dicts for the earlier layers;
      - ``enc_outputs`` (with `two_stage`): ``pred_logits`` / ``pred_boxes`` of every proposal.
    """

    def __init__(self, backbone, transformer, num_classes, num_feature_levels, aux_loss=True, with_box_refine=False,
                 two_stage=False, num_queries_one2one=300, num_queries_one2many=0, mixed_selection=False):
        super().__init__()
        if two_stage and not with_box_refine:
            # The proposal heads are the decoder's last box head: officially, a crash at the first forward.
            raise ValueError("two_stage=True needs with_box_refine=True")
        num_queries = num_queries_one2one + num_queries_one2many
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        prior_prob = 0.01  # focal-loss prior: every class starts at 1% probability
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        self.class_embed = class_embed  # placeholders: keep the official order of the state dict
        self.bbox_embed = bbox_embed
        self.num_feature_levels = num_feature_levels
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)  # position and content
        elif mixed_selection:
            self.query_embed = nn.Embedding(num_queries, hidden_dim)  # content (positions come from proposals)
        self.input_proj = nn.ModuleList([nn.Sequential(nn.Conv2d(backbone.num_channels[0], hidden_dim, kernel_size=1),
                                                       nn.GroupNorm(32, hidden_dim))])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage

        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = _get_clones(class_embed, num_pred)
            self.bbox_embed = _get_clones(bbox_embed, num_pred)
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed  # the decoder refines its boxes with these
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)  # one head shared by every layer
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
            self.transformer.decoder.bbox_embed = None
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed  # ranks the proposals
            for head in self.bbox_embed:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)
        self.num_queries_one2one = num_queries_one2one
        self.mixed_selection = mixed_selection

    def active_num_queries(self) -> int:
        """Queries this forward runs: all in training, the one-to-one ones in eval mode (`num_queries` may have been
        lowered by hand, as the official hub does)."""
        n = self.num_queries
        if self.two_stage:
            n = min(n, self.transformer.two_stage_num_proposals)
        return n if self.training else min(n, self.num_queries_one2one)

    def forward(self, samples) -> dict:
        samples = _as_nested_tensor(samples, self.backbone.strides[0])
        device_type = samples.tensors.device.type
        if torch.is_autocast_enabled(device_type):
            return self._forward(samples)
        autocast = weights_autocast(self, device_type)  # half weights: run under autocast in their dtype
        with autocast:
            out = self._forward(samples)
        return out if isinstance(autocast, contextlib.nullcontext) else _to_float32(out)

    def _forward(self, samples: NestedTensor) -> dict:
        features, pos = self.backbone(samples)
        srcs = [proj(feature.tensors) for proj, feature in zip(self.input_proj, features)]
        masks = [feature.mask for feature in features]
        n = self.active_num_queries()
        n1 = min(self.num_queries_one2one, n)
        query_embeds = self.query_embed.weight[:n] if not self.two_stage or self.mixed_selection else None
        # Hybrid matching: one-to-one and one-to-many queries do not attend to each other.
        self_attn_mask = torch.zeros((n, n), dtype=torch.bool, device=srcs[0].device)
        self_attn_mask[n1:, :n1] = True
        self_attn_mask[:n1, n1:] = True
        (hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact, enc_outputs_delta,
         output_proposals, max_shape) = self.transformer(srcs, masks, pos, query_embeds, self_attn_mask,
                                                         num_proposals=n)
        layers = []
        for lvl in range(hs.shape[0]):
            reference = init_reference if lvl == 0 else inter_references[lvl - 1]
            layers.append(self._predict(lvl, hs[lvl], reference, max_shape))
        one2one = [{k: v[:, :n1] for k, v in layer.items()} for layer in layers]
        one2many = [{k: v[:, n1:] for k, v in layer.items()} for layer in layers]
        out = {**one2one[-1], **{f"{k}_one2many": v for k, v in one2many[-1].items()}}
        if self.aux_loss:
            out["aux_outputs"] = one2one[:-1]
            out["aux_outputs_one2many"] = one2many[:-1]
        if self.two_stage:
            out["enc_outputs"] = self._proposal_outputs(enc_outputs_class, enc_outputs_coord_unact, enc_outputs_delta,
                                                        output_proposals)
        return out

    def _predict(self, lvl: int, hidden: torch.Tensor, reference: torch.Tensor, max_shape) -> dict:
        """Class logits and boxes of decoder layer `lvl`: the box head's output moves `reference` in logit space."""
        delta = self.bbox_embed[lvl](hidden)
        reference = inverse_sigmoid(reference)
        if reference.shape[-1] == 4:
            boxes = delta + reference
        else:
            boxes = torch.cat([delta[..., :2] + reference, delta[..., 2:]], dim=-1)
        return {"pred_logits": self.class_embed[lvl](hidden), "pred_boxes": boxes.sigmoid()}

    def _proposal_outputs(self, enc_class, enc_coord_unact, enc_delta, proposals) -> dict:
        return {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}


class PlainDETRReParam(PlainDETR):
    """Plain-DETR with absolute boxes: ``pred_boxes`` (cx, cy, w, h) in pixels of the padded batch, the box heads
    predicting deltas from reference boxes (`delta2bbox`, clipped to each image). Besides the `PlainDETR` outputs,
    every output dict holds what the reparameterised loss compares: ``pred_boxes_old`` (the reference boxes) and
    ``pred_deltas`` (the predicted deltas); ``enc_outputs`` holds the proposals as ``pred_boxes_old``."""

    def _predict(self, lvl, hidden, reference, max_shape):
        if reference.shape[-1] != 4:
            raise ValueError("reparameterised boxes need 4-d reference boxes (two-stage proposals)")
        delta = self.bbox_embed[lvl](hidden)
        boxes = box_ops.box_xyxy_to_cxcywh(box_ops.delta2bbox(reference, delta, max_shape))
        return {"pred_logits": self.class_embed[lvl](hidden), "pred_boxes": boxes, "pred_boxes_old": reference,
                "pred_deltas": delta}

    def _proposal_outputs(self, enc_class, enc_coord_unact, enc_delta, proposals):
        return {"pred_logits": enc_class, "pred_boxes": enc_coord_unact, "pred_boxes_old": proposals,
                "pred_deltas": enc_delta}


class PostProcess(nn.Module):
    """Detector outputs -> per image ``scores``, ``labels`` and ``boxes`` (XYXY, pixels) of the `topk` best
    (query, class) pairs by sigmoid score (COCO style: a query may give several classes).

    `target_sizes` (B, 2): each image's (height, width). Normalised boxes (`reparam` False) are scaled to it.
    Absolute boxes (`reparam` True) are clipped to it and scaled by `original_target_sizes` / `target_sizes`
    (the size to report them at; by default `target_sizes`, where the official code requires it).
    """

    def __init__(self, topk: int = 100, reparam: bool = False):
        super().__init__()
        self.topk = topk
        self.reparam = reparam

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor, original_target_sizes: torch.Tensor | None = None):
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes) or target_sizes.ndim != 2 or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be ({len(logits)}, 2) (height, width), got {tuple(target_sizes.shape)}")
        if original_target_sizes is None:
            original_target_sizes = target_sizes
        batch, _, num_classes = logits.shape
        prob = logits.sigmoid().view(batch, -1)
        scores, index = torch.topk(prob, min(self.topk, prob.shape[1]), dim=1)
        labels = index % num_classes
        boxes = box_ops.box_cxcywh_to_xyxy(boxes)
        boxes = torch.gather(boxes, 1, (index // num_classes).unsqueeze(-1).expand(-1, -1, 4))
        img_h, img_w = target_sizes.unbind(1)
        if self.reparam:
            img_h, img_w = img_h[:, None, None], img_w[:, None, None]
            zero = torch.zeros_like(img_w)
            xs = boxes[..., 0::2].clamp(min=zero, max=img_w)
            ys = boxes[..., 1::2].clamp(min=zero, max=img_h)
            boxes = torch.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], dim=-1)
            scale_h, scale_w = (original_target_sizes / target_sizes).unbind(1)
        else:
            scale_h, scale_w = img_h, img_w
        boxes = boxes * torch.stack([scale_w, scale_h, scale_w, scale_h], dim=1)[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


def check_head_config(args) -> None:
    """Refuse the settings the official code builds but cannot run (one line naming the field)."""
    if args.decoder_type not in DECODERS:
        raise ValueError(f"decoder_type must be one of {sorted(DECODERS)}, not {args.decoder_type!r}")
    if args.norm_type not in ("pre_norm", "post_norm"):
        raise ValueError(f"norm_type must be 'pre_norm' or 'post_norm', not {args.norm_type!r}")
    if args.two_stage and not args.with_box_refine:
        raise ValueError("two_stage=True needs with_box_refine=True (the proposals are scored by the last box head)")
    if not args.two_stage and args.decoder_type == "global_rpe_decomp":
        raise ValueError("decoder_type='global_rpe_decomp' needs two_stage=True (its position bias needs reference boxes)")
    if args.reparam and (not args.two_stage or args.decoder_type != "global_rpe_decomp"):
        raise ValueError("reparam=True needs two_stage=True and decoder_type='global_rpe_decomp'")
    if args.hidden_dim % 32 or args.hidden_dim % args.nheads:
        raise ValueError(f"hidden_dim={args.hidden_dim} must be a multiple of 32 (GroupNorm) and of nheads={args.nheads}")
    if args.num_queries_one2one < 1 or args.num_queries_one2many < 0:
        raise ValueError(f"num_queries_one2one ({args.num_queries_one2one}) must be >= 1 and num_queries_one2many "
                         f"({args.num_queries_one2many}) >= 0")
    if args.dec_layers < 1:
        raise ValueError(f"dec_layers={args.dec_layers} must be >= 1")
    if args.num_feature_levels < 1:
        raise ValueError(f"num_feature_levels={args.num_feature_levels} must be >= 1")
    PositionEncoding.parse(args.position_embedding)


def resolve_head_config(backbone_model: nn.Module, args):
    """A copy of `args` with the fields left None filled from the backbone as the official hub does:
    `layers_to_use` four blocks evenly spaced ([2, 5, 8, 11] of 12), `proposal_in_stride` the patch size,
    `proposal_tgt_strides` half, one, two and four times it."""
    args = copy.copy(args)
    patch_size = backbone_model.patch_size
    if args.layers_to_use is None:
        args.layers_to_use = [m * backbone_model.n_blocks // 4 - 1 for m in range(1, 5)]
    if args.proposal_in_stride is None:
        args.proposal_in_stride = patch_size
    if args.proposal_tgt_strides is None:
        args.proposal_tgt_strides = [int(m * patch_size) for m in (0.5, 1, 2, 4)]
    return args


def build_model(backbone_model: nn.Module, args) -> PlainDETR:
    """The detector of `args` (a `DetectionHeadConfig`) on `backbone_model` (frozen and marked here):
    `PlainDETRReParam` when `args.reparam`, else `PlainDETR`. Fields left None are filled from the backbone
    (`resolve_head_config`); the official code needs them set."""
    check_head_config(args)
    args = resolve_head_config(backbone_model, args)
    backbone = build_backbone(backbone_model, args)
    transformer = build_transformer(args)
    model_class = PlainDETRReParam if args.reparam else PlainDETR
    return model_class(
        backbone,
        transformer,
        num_classes=args.num_classes,
        num_feature_levels=args.num_feature_levels,
        aux_loss=args.aux_loss,
        with_box_refine=args.with_box_refine,
        two_stage=args.two_stage,
        num_queries_one2one=args.num_queries_one2one,
        num_queries_one2many=args.num_queries_one2many,
        mixed_selection=args.mixed_selection,
    )


def load_detector_head(model: PlainDETR, state_dict: dict, source: str) -> PlainDETR:
    """Strictly load a head checkpoint (everything but the frozen backbone, official keys; ``module.`` from DDP
    dropped) into `model`, by assignment where the head is on the meta device. The box and class heads are
    shared with the decoder (``bbox_embed.*`` = ``transformer.decoder.bbox_embed.*``): a file holding one of the
    two names is completed with the other. Raises `CheckpointError` naming the missing / unexpected keys."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    state_dict = dict(state_dict)
    aliases: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), []).append(name)
    for names in aliases.values():
        present = [n for n in names if n in state_dict]
        if present:
            first = state_dict[present[0]]
            for other in present[1:]:
                if state_dict[other].shape != first.shape or not torch.equal(state_dict[other], first):
                    raise CheckpointError(f"{source}: {present[0]} and {other} are one tensor in the detector but "
                                          "differ in the checkpoint")
            for name in names:
                state_dict.setdefault(name, first)
    assign = any(t.is_meta for t in model.state_dict().values())
    load_head_state_dict(model, state_dict, source, assign=assign)
    return model
