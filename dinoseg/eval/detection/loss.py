"""The training loss of the official DINOv3 detector: Plain-DETR's set criterion, with its names and call forms.

The official DINOv3 release has the detector (a Plain-DETR) but not its loss; this is Plain-DETR's (github
impiga/Plain-DETR, `models/detr.py`, `models/matcher.py`, `engine.train_hybrid`). Each image's targets are matched
one-to-one to the queries by a Hungarian matching (`HungarianMatcher`); the matched queries learn their box (L1 and
GIoU) and class, every query learns "no object" for the classes it is not matched to (sigmoid focal loss). The same
loss is repeated on every earlier decoder layer (keys `<name>_<i>`), on the two-stage proposals (`<name>_enc`, class
agnostic: every target has label 0) and, with hybrid matching (`train_hybrid`), on the one-to-many queries against
the targets repeated `k_one2many` times (`<name>_one2many`, no `_enc` part). The training loss is
`sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)`; `class_error` and `cardinality_error`
are logged only.

Targets: one dict per image, with `labels` (int64 (N,), in [0, num_classes)) and `boxes` ((N, 4) float cx, cy, w, h),
normalised by the image size for the plain detector, in pixels of the network input for the `reparam` detector (the
released one). An image may have no boxes. Crowd boxes must be removed beforehand: every target is an object to find.

Outputs (the detector's training forward): `pred_logits` (B, Q, C), `pred_boxes` (B, Q, 4) cx, cy, w, h in the
targets' units; with `reparam` also `pred_boxes_old` (B, Q, 4: the reference boxes, pixels) and `pred_deltas` (B, Q, 4:
the regressed deltas from them), whose difference to `bbox2delta(pred_boxes_old, target)` is the L1 term, in the
matching cost and in the loss, instead of the boxes' own difference. Optionally `aux_outputs` (a list of such dicts,
one per earlier decoder layer) and `enc_outputs` (one such dict: the proposals); for `train_hybrid`, the same keys
with `_one2many` (`pred_logits_one2many`, `pred_boxes_one2many`, `aux_outputs_one2many`, ...).
"""

import torch
import torch.nn.functional as F
from torch import nn

from dinoseg.engine import distributed
from dinoseg.engine.optim import TrainingError

from .util.box_ops import bbox2delta, box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "SetCriterion", "build_criterion", "build_weight_dict", "sigmoid_focal_loss", "train_hybrid"]

LOSSES = ("labels", "boxes", "cardinality")
COST_BBOX_TYPES = ("l1", "reparam")


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2) -> torch.Tensor:
    """RetinaNet's focal loss of the logits `inputs` against 0 / 1 `targets` (same shape, (B, Q, ...)): the mean over
    dim 1 of the per-element loss, summed, divided by `num_boxes`. `alpha` weighs positives (negatives 1 - alpha);
    a negative `alpha` weighs neither."""
    prob = inputs.sigmoid()
    bce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    prob_true = prob * targets + (1 - prob) * (1 - targets)  # the probability given to the right answer
    loss = bce * (1 - prob_true) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean(1).sum() / num_boxes


def _paired_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of boxes1[k] with boxes2[k] (xyxy, (K, 4) each): the diagonal of `generalized_box_iou`, without the
    K x K matrix."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    overlap = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = overlap[:, 0] * overlap[:, 1]
    union = area1 + area2 - inter
    hull = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull_area = hull[:, 0] * hull[:, 1]
    return inter / union - (hull_area - union) / hull_area


def _upcast(outputs):
    """The outputs with float16 / bfloat16 tensors in float32 (differentiable): the matching and the loss sums
    need more precision than the detector's autocast gives."""
    if isinstance(outputs, dict):
        return {k: _upcast(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_upcast(v) for v in outputs]
    if isinstance(outputs, torch.Tensor) and outputs.dtype in (torch.float16, torch.bfloat16):
        return outputs.float()
    return outputs


def _reparam_outputs(outputs: dict, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    if "pred_deltas" not in outputs or "pred_boxes_old" not in outputs:
        raise TrainingError(f"{who}: the box term is reparameterised (reparam=True) but the outputs have no "
                            f"pred_deltas / pred_boxes_old (keys: {sorted(outputs)}); a plain detector needs reparam=False")
    return outputs["pred_deltas"], outputs["pred_boxes_old"]


class HungarianMatcher(nn.Module):
    """The one-to-one assignment of each image's targets to queries that minimises the summed cost
    `cost_class * focal + cost_bbox * L1 + cost_giou * (-GIoU)`; queries left over are "no object".

    The class cost is the focal loss of the target's class (alpha 0.25, gamma 2, fixed as in Plain-DETR). The L1 cost
    compares boxes (`cost_bbox_type="l1"`) or, for the reparameterised detector (`"reparam"`), the predicted deltas
    `pred_deltas` with the deltas from `pred_boxes_old` to each target (`bbox2delta`). The cost is computed for the
    whole batch at once on the outputs' device (half-precision outputs in float32); the assignment (scipy) runs on the
    CPU, per image.
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1, cost_bbox_type: str = "l1"):
        super().__init__()
        if cost_bbox_type not in COST_BBOX_TYPES:
            raise ValueError(f"cost_bbox_type={cost_bbox_type!r}: expected one of {list(COST_BBOX_TYPES)}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou are all 0; the matching would be arbitrary")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.cost_bbox_type = cost_bbox_type

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, (query indices, target indices) of the matched pairs (int64, on the CPU, min(Q, N_i) each)."""
        from scipy.optimize import linear_sum_assignment  # imported when first matching: scipy is slow to import

        outputs = _upcast(outputs)
        batch_size, num_queries = outputs["pred_logits"].shape[:2]
        prob = outputs["pred_logits"].flatten(0, 1).sigmoid()  # (B*Q, C)
        boxes = outputs["pred_boxes"].flatten(0, 1)
        target_labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets])

        # Rows: every query of the batch; columns: every target of the batch (only an image's own block is used).
        prob = prob[:, target_labels]
        alpha, gamma = 0.25, 2.0
        cost_positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        cost_negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        cost_class = cost_positive - cost_negative

        if self.cost_bbox_type == "l1":
            cost_bbox = torch.cdist(boxes, target_boxes, p=1)
        else:
            deltas, references = _reparam_outputs(outputs, "HungarianMatcher")
            deltas, references = deltas.flatten(0, 1), references.flatten(0, 1)
            pairs = (len(references), len(target_boxes), 4)  # every (query, target) pair, whatever the counts
            target_deltas = bbox2delta(references[:, None].expand(pairs), target_boxes[None].expand(pairs))
            cost_bbox = (deltas[:, None] - target_deltas).abs().sum(-1)

        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(batch_size, num_queries, -1).cpu()

        indices = []
        for i, image_cost in enumerate(cost.split([len(t["boxes"]) for t in targets], -1)):
            try:
                queries, matched = linear_sum_assignment(image_cost[i])
            except ValueError as e:  # NaN or -inf costs: the predictions (or the target boxes) are not finite
                raise TrainingError(f"HungarianMatcher: image {i} of the batch: {e} (non-finite predicted or target "
                                    f"boxes; target boxes need width and height > 0)") from None
            indices.append((torch.as_tensor(queries, dtype=torch.int64), torch.as_tensor(matched, dtype=torch.int64)))
        return indices


class SetCriterion(nn.Module):
    """Plain-DETR's detection loss: match (`matcher`), then the requested `losses` ("labels": sigmoid focal
    `loss_ce` and the logged `class_error`; "boxes": `loss_bbox` (L1; of the deltas when `reparam`) and `loss_giou`;
    "cardinality": the logged `cardinality_error`), each divided by the number of target boxes averaged over the
    processes; repeated on `aux_outputs` (suffix `_<i>`) and `enc_outputs` (suffix `_enc`, class agnostic).
    `weight_dict` is kept for the trainer (`build_weight_dict`); the criterion itself does not weigh."""

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: dict, losses: list[str], focal_alpha: float = 0.25,
                 reparam: bool = False):
        super().__init__()
        unknown = [name for name in losses if name not in LOSSES]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; expected some of {list(LOSSES)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.losses = losses
        self.focal_alpha = focal_alpha
        self.loss_bbox_type = "reparam" if reparam else "l1"

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        """Sigmoid focal loss over all queries and classes: 1 for a matched query's target class, 0 elsewhere."""
        logits = outputs["pred_logits"]
        idx = self._get_src_permutation_idx(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        onehot = torch.zeros_like(logits)
        onehot[idx[0].to(logits.device), idx[1].to(logits.device), matched_labels.to(logits.device)] = 1
        # Summed over queries (the focal loss averages over dim 1).
        losses = {"loss_ce": sigmoid_focal_loss(logits, onehot, num_boxes, alpha=self.focal_alpha, gamma=2) * logits.shape[1]}
        if log:
            losses["class_error"] = 100 - self._accuracy(logits[idx], matched_labels)
        return losses

    @staticmethod
    @torch.no_grad()
    def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Top-1 accuracy in percent of the matched queries (0 when nothing is matched, as Plain-DETR)."""
        if labels.numel() == 0:
            return torch.zeros([], device=logits.device)
        top = logits.topk(1, dim=1).indices[:, 0]
        return (top == labels).float().sum() * (100.0 / labels.numel())

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes):
        """Mean |predicted - true| number of objects per image, logged only. As in Plain-DETR, a query counts as a
        detection when its top class is not the last one (a rule from softmax DETR, whose last class is "no
        object"; with sigmoid classes it mostly counts queries)."""
        logits = outputs["pred_logits"]
        true_counts = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted.float(), true_counts.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """L1 (of the boxes, or of the deltas from the reference boxes when `reparam`) and 1 - GIoU of the matched
        pairs, each summed and divided by `num_boxes`."""
        idx = self._get_src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        if self.loss_bbox_type == "reparam":
            deltas, references = _reparam_outputs(outputs, "SetCriterion")
            loss_bbox = F.l1_loss(deltas[idx], bbox2delta(references[idx], target_boxes), reduction="none")
        else:
            loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        giou = _paired_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}

    def _get_src_permutation_idx(self, indices):
        """(image index, query index) of every matched pair, image by image."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        return batch_idx, torch.cat([src for src, _ in indices])

    def _get_tgt_permutation_idx(self, indices):
        """(image index, target index) of every matched pair, image by image."""
        batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
        return batch_idx, torch.cat([tgt for _, tgt in indices])

    def get_loss(self, loss, outputs, targets, indices, num_boxes, **kwargs):
        loss_map = {"labels": self.loss_labels, "cardinality": self.loss_cardinality, "boxes": self.loss_boxes}
        if loss not in loss_map:
            raise ValueError(f"SetCriterion: unknown loss {loss!r}; expected one of {list(loss_map)}")
        return loss_map[loss](outputs, targets, indices, num_boxes, **kwargs)

    def _average_num_boxes(self, targets: list[dict], device: torch.device) -> float:
        """The number of target boxes per process, averaged over the processes (so that every box weighs the same
        whichever process holds it), at least 1."""
        count = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        distributed.all_reduce_sum(count)
        return torch.clamp(count / distributed.get_world_size(), min=1).item()

    def _check_labels(self, targets: list[dict]) -> None:
        labels = torch.cat([t["labels"] for t in targets])
        if labels.numel() and not ((labels >= 0) & (labels < self.num_classes)).all():
            bad = labels[(labels < 0) | (labels >= self.num_classes)].unique().tolist()
            raise TrainingError(f"SetCriterion: target labels {bad} outside [0, num_classes={self.num_classes})")

    def _layer_losses(self, outputs, targets, num_boxes, suffix):
        indices = self.matcher(outputs, targets)
        losses = {}
        for loss in self.losses:
            kwargs = {"log": False} if loss == "labels" else {}  # class_error for the last layer only
            losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes, **kwargs))
        return {k + suffix: v for k, v in losses.items()}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """The loss dict (unweighted) of the last layer's outputs, then of `aux_outputs` and `enc_outputs`; in float32
        (at least) whatever the outputs' precision."""
        self._check_labels(targets)
        outputs = _upcast(outputs)
        last_layer = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs")}
        indices = self.matcher(last_layer, targets)
        num_boxes = self._average_num_boxes(targets, outputs["pred_logits"].device)

        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes))
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._layer_losses(aux_outputs, targets, num_boxes, f"_{i}"))
        if "enc_outputs" in outputs:
            # The proposals only tell objects from background: every target is of class 0.
            class_agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._layer_losses(outputs["enc_outputs"], class_agnostic, num_boxes, "_enc"))
        return losses


def train_hybrid(outputs: dict, targets: list[dict], k_one2many: int, criterion: SetCriterion,
                 lambda_one2many: float) -> dict[str, torch.Tensor]:
    """Hybrid matching (Plain-DETR's `engine.train_hybrid`): `criterion` on the one-to-one queries, plus, with the
    suffix `_one2many` and times `lambda_one2many`, on the one-to-many queries (`*_one2many` outputs) against every
    image's targets repeated `k_one2many` times, so that each object is matched to up to `k_one2many` queries."""
    if k_one2many < 1:
        raise ValueError(f"train_hybrid: k_one2many={k_one2many}; expected >= 1 (with 0, call the criterion alone)")
    loss_dict = criterion(outputs, targets)
    repeated = [{**t, "boxes": t["boxes"].repeat(k_one2many, 1), "labels": t["labels"].repeat(k_one2many)}
                for t in targets]
    one2many = {"pred_logits": outputs["pred_logits_one2many"], "pred_boxes": outputs["pred_boxes_one2many"]}
    if "aux_outputs_one2many" in outputs:
        one2many["aux_outputs"] = outputs["aux_outputs_one2many"]
    if "pred_boxes_old_one2many" in outputs:
        one2many["pred_boxes_old"] = outputs["pred_boxes_old_one2many"]
        one2many["pred_deltas"] = outputs["pred_deltas_one2many"]
    for key, value in criterion(one2many, repeated).items():
        name = key + "_one2many"
        loss_dict[name] = loss_dict[name] + value * lambda_one2many if name in loss_dict else value * lambda_one2many
    return loss_dict


def build_weight_dict(cls_loss_coef: float = 2.0, bbox_loss_coef: float = 5.0, giou_loss_coef: float = 2.0, *,
                      dec_layers: int, aux_loss: bool = True, two_stage: bool = True) -> dict[str, float]:
    """The weight of every loss entry, as Plain-DETR builds it (defaults: its coefficients): `loss_ce`, `loss_bbox`,
    `loss_giou`; with `aux_loss` the same for layers `_0` .. `_<dec_layers - 2>`; with `two_stage` for `_enc`; then
    all of these again with `_one2many`. (Plain-DETR adds `_enc` with `aux_loss` instead of `two_stage`, which leaves
    the proposals untrained when aux_loss is off.)"""
    base = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    weights = dict(base)
    if aux_loss:
        for i in range(dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    if two_stage:
        weights.update({f"{k}_enc": v for k, v in base.items()})
    weights.update({f"{k}_one2many": v for k, v in list(weights.items())})
    return weights


def build_criterion(num_classes: int, *, reparam: bool, dec_layers: int, aux_loss: bool = True, two_stage: bool = True,
                    cls_loss_coef: float = 2.0, bbox_loss_coef: float = 5.0, giou_loss_coef: float = 2.0,
                    set_cost_class: float = 2.0, set_cost_bbox: float = 5.0, set_cost_giou: float = 2.0,
                    focal_alpha: float = 0.25) -> SetCriterion:
    """The criterion Plain-DETR trains with (defaults: its coefficients, matcher costs and focal alpha), for a
    detector built with `num_classes`, `reparam`, `dec_layers`, `aux_loss` and `two_stage` (its DetectionHeadConfig
    values); its `weight_dict` is `build_weight_dict`'s."""
    matcher = HungarianMatcher(cost_class=set_cost_class, cost_bbox=set_cost_bbox, cost_giou=set_cost_giou,
                               cost_bbox_type="reparam" if reparam else "l1")
    weight_dict = build_weight_dict(cls_loss_coef, bbox_loss_coef, giou_loss_coef, dec_layers=dec_layers,
                                    aux_loss=aux_loss, two_stage=two_stage)
    return SetCriterion(num_classes, matcher, weight_dict, list(LOSSES), focal_alpha=focal_alpha, reparam=reparam)
