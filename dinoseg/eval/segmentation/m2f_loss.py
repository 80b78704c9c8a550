"""Mask2Former training losses: semantic targets, Hungarian matcher and set criterion.

The formulas follow Mask2Former (Cheng et al., 2022): class cross-entropy with a down-weighted no-object class,
sigmoid-BCE and dice on point samples (PointRend-style importance sampling for the loss, uniform points for the
matcher), both normalised by the number of target masks over all processes, and deep supervision on every
auxiliary decoder layer.

Ignored pixels: a semantic label map marks some pixels `ignore_index` (void, padding). Mask2Former's semantic
mapper turns them into "not this class" in every binary mask, which penalises the model for whatever it predicts
there. Here each target carries a `valid` map; every sampled point gets a weight equal to the bilinearly sampled
`valid` (0 on ignored pixels, fractional next to them), the sampled target value is renormalised by that weight
(bilinear interpolation over valid pixels only), and BCE is the weighted mean over points, dice the weighted
dice. With no ignored pixels the weights are all 1 and the formulas are Mask2Former's (sampling differs only
within half a pixel of the image border, see `_SAMPLE_PADDING`).

`Mask2FormerLoss(num_classes, ignore_index=..., **cfg.train.m2f_loss)` takes the config's loss settings as is.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...engine import distributed
from ...layers.deterministic import cross_entropy, grid_sample_bilinear

__all__ = [
    "HungarianMatcher",
    "Mask2FormerLoss",
    "SetCriterion",
    "calculate_uncertainty",
    "get_uncertain_point_coords_with_randomness",
    "point_sample",
    "semantic_to_instance_targets",
    "total_loss",
]

# Points within half a pixel of the image border: Mask2Former samples with zero padding, which fades a full
# target mask to 0.25 in the corners and pulls predicted logits towards 0 (extra "uncertain" points) there. The
# losses here replicate the border pixel instead, for predictions, targets and valid maps alike.
_SAMPLE_PADDING = "border"
# Weight below which a sampled point counts as fully ignored (avoids 0/0 when renormalising targets).
_VALID_EPS = 1e-6


def semantic_to_instance_targets(
    labels: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> list[dict[str, torch.Tensor | None]]:
    """Split a batch of semantic label maps [B, H, W] into one binary mask per class present in each image.

    Returns, per image, `labels` (LongTensor [K], sorted class ids), `masks` (BoolTensor [K, H, W]) and `valid`
    (BoolTensor [H, W] of non-ignored pixels, or None when the image has no ignored pixel). An image whose pixels
    are all ignored gets K = 0.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"semantic_to_instance_targets: labels must be a [B, H, W] tensor, got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"semantic_to_instance_targets: labels must have an integer dtype, got {labels.dtype}"
        )
    targets = []
    for b, label_map in enumerate(labels):
        classes = torch.unique(label_map)  # sorted; one host sync per image, which the matcher needs anyway
        has_ignore = bool((classes == ignore_index).any())
        classes = classes[classes != ignore_index]
        bad = classes[(classes < 0) | (classes >= num_classes)]
        if bad.numel():
            raise ValueError(
                f"semantic_to_instance_targets: image {b} has label {int(bad[0])} outside [0, {num_classes}) "
                f"that is not ignore_index={ignore_index}"
            )
        masks = classes[:, None, None] == label_map[None]
        valid = label_map != ignore_index if has_ignore else None
        targets.append({"labels": classes.long(), "masks": masks, "valid": valid})
    return targets


def point_sample(
    input: torch.Tensor, point_coords: torch.Tensor, align_corners: bool = False, padding_mode: str = "zeros"
) -> torch.Tensor:
    """Bilinearly sample `input` [N, C, H, W] at `point_coords` in [0, 1] x [0, 1] ((x, y) order).

    `point_coords` [N, P, 2] gives [N, C, P]; [N, Hp, Wp, 2] gives [N, C, Hp, Wp]. Normalised coordinates make
    maps of different resolutions (stride-4 logits, full-size labels) sample the same image locations.
    `padding_mode` as in `F.grid_sample` (the losses use "border", see `_SAMPLE_PADDING`).
    """
    if point_coords.dim() not in (3, 4) or point_coords.shape[-1] != 2:
        raise ValueError(
            f"point_sample: point_coords must be [N, P, 2] or [N, H, W, 2], got {tuple(point_coords.shape)}"
        )
    grid = 2.0 * point_coords - 1.0  # grid_sample works in [-1, 1]
    kwargs = {"align_corners": align_corners, "padding_mode": padding_mode}
    if point_coords.dim() == 3:
        return grid_sample_bilinear(input, grid.unsqueeze(2), **kwargs).squeeze(3)
    return grid_sample_bilinear(input, grid, **kwargs)


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of class-agnostic mask logits [N, 1, ...]: highest where the logit is closest to 0."""
    return -logits.abs()


def get_uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """PointRend training point selection on `coarse_logits` [N, C, H, W] -> coords [N, num_points, 2] in [0, 1].

    Draw `num_points * oversample_ratio` uniform candidates, keep the `importance_sample_ratio * num_points` most
    uncertain ones (by `uncertainty_func` on the sampled logits, [N, 1, P] -> [N, 1, P]), fill up with fresh
    uniform points so that the loss still sees the whole mask.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    n = coarse_logits.shape[0]
    device = coarse_logits.device
    num_candidates = int(num_points * oversample_ratio)
    candidates = torch.rand(n, num_candidates, 2, device=device)
    uncertainty = uncertainty_func(point_sample(coarse_logits, candidates, padding_mode=padding_mode))[:, 0]
    num_uncertain = int(importance_sample_ratio * num_points)
    top = uncertainty.topk(num_uncertain, dim=1).indices  # [N, num_uncertain]
    coords = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        coords = torch.cat([coords, torch.rand(n, num_random, 2, device=device)], dim=1)
    return coords


def _sample_targets(
    masks: torch.Tensor, valid: torch.Tensor | None, coords: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample K target masks [K, H, W] at coords [K, P, 2] (or [1, P, 2], shared) -> (targets [K, P], weights).

    Weights ([K or 1, P]) are the sampled valid fraction, None without ignored pixels; targets are renormalised
    by them so a point half on an ignored pixel is interpolated from its valid neighbours only.
    """
    masks = masks.to(torch.float32)
    if coords.shape[0] == 1:  # shared points: sample the K masks as channels of one image
        target = point_sample(masks[None], coords, padding_mode=_SAMPLE_PADDING)[0]
    else:
        target = point_sample(masks[:, None], coords, padding_mode=_SAMPLE_PADDING)[:, 0]
    if valid is None:
        return target, None
    weight = point_sample(
        valid.to(torch.float32)[None, None], coords.reshape(1, -1, 2), padding_mode=_SAMPLE_PADDING
    )[0, 0]
    weight = weight.view(coords.shape[0], -1)
    target = torch.where(weight > _VALID_EPS, target / weight.clamp_min(_VALID_EPS), torch.zeros_like(target))
    return target.clamp_(0.0, 1.0), weight


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to target masks per image, minimising

        cost_class * (-p(target class)) + cost_mask * sigmoid-BCE + cost_dice * dice,

    the mask costs on `num_points` uniform points shared by predictions and targets of an image (ignored pixels
    get weight 0). Returns, per image, (query indices, target indices) as CPU LongTensors sorted by query.
    """

    def __init__(
        self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544
    ):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        if num_points <= 0:
            raise ValueError(f"HungarianMatcher: num_points must be positive, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, target: dict) -> torch.Tensor:
        """Cost [Q, K] of one image: pred_logits [Q, C+1], pred_masks [Q, h, w], target as built above."""
        with _no_autocast(pred_logits.device):
            prob = pred_logits.float().softmax(-1)
            tgt_ids = target["labels"].to(pred_logits.device)
            cost_class = -prob[:, tgt_ids]

            coords = torch.rand(1, self.num_points, 2, device=pred_masks.device)
            tgt, weight = _sample_targets(
                target["masks"].to(pred_masks.device), _valid(target, pred_masks), coords
            )
            out = point_sample(pred_masks.float()[None], coords, padding_mode=_SAMPLE_PADDING)[0]  # [Q, P]
            w = torch.ones_like(out[:1]) if weight is None else weight  # [1, P]

            # BCE(x, t) = t * BCE(x, 1) + (1 - t) * BCE(x, 0): one matmul per term for all (query, target) pairs.
            pos = F.binary_cross_entropy_with_logits(out, torch.ones_like(out), reduction="none") * w
            neg = F.binary_cross_entropy_with_logits(out, torch.zeros_like(out), reduction="none") * w
            cost_mask = (pos @ tgt.T + neg @ (1 - tgt).T) / w.sum().clamp_min(_VALID_EPS)

            p = out.sigmoid() * w
            numerator = 2 * p @ tgt.T
            denominator = p.sum(-1)[:, None] + (tgt * w).sum(-1)[None, :]
            cost_dice = 1 - (numerator + 1) / (denominator + 1)
            return self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(self, outputs: dict, targets: Sequence[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from scipy.optimize import linear_sum_assignment  # imported when first matching: scipy is slow to import

        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(
                f"HungarianMatcher: {pred_logits.shape[0]} predictions but {len(targets)} targets"
            )
        indices = []
        for b, target in enumerate(targets):
            if target["labels"].numel() == 0:
                empty = torch.empty(0, dtype=torch.long)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(pred_logits[b], pred_masks[b], target).cpu()
            if not torch.isfinite(cost).all():
                raise ValueError(
                    f"HungarianMatcher: non-finite matching cost in image {b} (NaN/inf predictions?)"
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return indices


def _valid(target: dict, like: torch.Tensor) -> torch.Tensor | None:
    valid = target.get("valid")
    return None if valid is None else valid.to(like.device)


def _num_masks(targets: Sequence[dict], device: torch.device) -> float:
    """Number of target masks averaged over processes (so every rank divides by the same number), at least 1."""
    num = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    return max(distributed.all_reduce_sum(num).item() / distributed.get_world_size(), 1.0)


class SetCriterion(nn.Module):
    """Mask2Former losses for matched query/target pairs.

    `loss_ce`: cross-entropy over all queries, unmatched ones pushed to the no-object class (index `num_classes`)
    whose weight is `eos_coef`. `loss_mask` / `loss_dice`: sigmoid-BCE and dice of matched masks on `num_points`
    importance-sampled points, summed over masks and divided by the number of target masks. Each entry of
    `outputs["aux_outputs"]` is re-matched and gives the same losses suffixed `_<i>`.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float = 0.1,
        losses: Sequence[str] = ("labels", "masks"),
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ):
        super().__init__()
        unknown = set(losses) - {"labels", "masks"}
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {sorted(unknown)}; choose from 'labels', 'masks'")
        if num_classes <= 0 or num_points <= 0:
            raise ValueError(
                f"SetCriterion: num_classes={num_classes} and num_points={num_points} must be positive"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def loss_labels(self, outputs: dict, targets, indices, num_masks: float) -> dict[str, torch.Tensor]:
        logits = outputs["pred_logits"].float()
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        batch_idx, query_idx = _permutation_idx(indices, logits.device)
        if batch_idx.numel():
            classes[batch_idx, query_idx] = torch.cat(
                [t["labels"].to(logits.device)[tgt] for t, (_, tgt) in zip(targets, indices)]
            )
        weight = self.empty_weight.to(logits.device)
        return {"loss_ce": cross_entropy(logits.transpose(1, 2), classes, weight)}

    def loss_masks(self, outputs: dict, targets, indices, num_masks: float) -> dict[str, torch.Tensor]:
        pred_masks = outputs["pred_masks"]
        batch_idx, query_idx = _permutation_idx(indices, pred_masks.device)
        if batch_idx.numel() == 0:
            # Keep the graph connected (DDP expects every parameter to get a gradient) with an exact zero.
            zero = pred_masks.float().sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        src = pred_masks[batch_idx, query_idx].float()[:, None]  # [N, 1, h, w]

        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src,
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
                padding_mode=_SAMPLE_PADDING,
            )
            # Targets are sampled per image at their own resolution with the coords of that image's masks.
            tgt_list, w_list, start = [], [], 0
            any_ignore = any(t.get("valid") is not None for t in targets)
            for target, (_, tgt) in zip(targets, indices):
                n = len(tgt)
                if n == 0:
                    continue
                masks = target["masks"].to(src.device)[tgt.to(src.device)]
                t, w = _sample_targets(masks, _valid(target, src), coords[start : start + n])
                tgt_list.append(t)
                if any_ignore:
                    w_list.append(torch.ones_like(t) if w is None else w)
                start += n
            point_labels = torch.cat(tgt_list)
            weight = torch.cat(w_list) if any_ignore else None

        point_logits = point_sample(src, coords, padding_mode=_SAMPLE_PADDING)[:, 0]  # [N, P]
        bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
        prob = point_logits.sigmoid()
        if weight is None:
            loss_mask = bce.mean(1)
            numerator = 2 * (prob * point_labels).sum(1)
            denominator = prob.sum(1) + point_labels.sum(1)
        else:
            loss_mask = (bce * weight).sum(1) / weight.sum(1).clamp_min(_VALID_EPS)
            numerator = 2 * (prob * point_labels * weight).sum(1)
            denominator = (prob * weight).sum(1) + (point_labels * weight).sum(1)
        loss_dice = 1 - (numerator + 1) / (denominator + 1)
        return {"loss_mask": loss_mask.sum() / num_masks, "loss_dice": loss_dice.sum() / num_masks}

    def _losses_for(self, outputs: dict, targets, num_masks: float) -> dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        losses = {}
        if "labels" in self.losses:
            losses.update(self.loss_labels(outputs, targets, indices, num_masks))
        if "masks" in self.losses:
            losses.update(self.loss_masks(outputs, targets, indices, num_masks))
        return losses

    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        for key in ("pred_logits", "pred_masks"):
            if key not in outputs:
                raise KeyError(f"SetCriterion: outputs has no '{key}' (keys: {sorted(outputs)})")
        c = outputs["pred_logits"].shape[-1]
        if c != self.num_classes + 1:
            raise ValueError(
                f"SetCriterion: pred_logits has {c} classes, expected num_classes + 1 = {self.num_classes + 1}"
            )
        device = outputs["pred_logits"].device
        # Losses in float32 whatever the autocast state: bf16 sigmoid/BCE/softmax lose too much precision.
        with _no_autocast(device):
            num_masks = _num_masks(targets, device)
            losses = self._losses_for(outputs, targets, num_masks)
            for i, aux in enumerate(outputs.get("aux_outputs") or []):
                losses.update({f"{k}_{i}": v for k, v in self._losses_for(aux, targets, num_masks).items()})
        return losses


def _permutation_idx(indices, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx.to(device), query_idx.to(device)


def total_loss(losses: dict[str, torch.Tensor], weight_dict: dict[str, float]) -> torch.Tensor:
    """Weighted sum of `losses`; an auxiliary `<name>_<i>` without its own weight uses the weight of `<name>`."""
    total = None
    for key, value in losses.items():
        base, _, suffix = key.rpartition("_")
        if key in weight_dict:
            w = weight_dict[key]
        elif suffix.isdigit() and base in weight_dict:
            w = weight_dict[base]
        else:
            raise ValueError(f"total_loss: no weight for loss '{key}' in weight_dict {sorted(weight_dict)}")
        total = value * w if total is None else total + value * w
    if total is None:
        raise ValueError("total_loss: no losses to sum")
    return total


class Mask2FormerLoss(nn.Module):
    """The training loss of a Mask2Former head on semantic label maps: the one object the training loop calls.

    `forward(outputs, labels)` with the head's training outputs `{"pred_logits": [B, Q, C+1], "pred_masks":
    [B, Q, h, w], "aux_outputs": [...]}` and label maps [B, H, W] (any H, W: targets are point-sampled at their own
    resolution) returns (weighted total loss, detached unweighted losses for logging).
    """

    def __init__(
        self,
        num_classes: int,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        train_num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
        ignore_index: int = 255,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.deep_supervision = deep_supervision
        self.weight_dict = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points=train_num_points)
        self.criterion = SetCriterion(
            num_classes,
            matcher,
            self.weight_dict,
            eos_coef=no_object_weight,
            num_points=train_num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
        )

    def forward(self, outputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "pred_logits" not in outputs or "pred_masks" not in outputs:
            raise KeyError(
                f"Mask2FormerLoss: outputs must hold 'pred_logits' and 'pred_masks', got {sorted(outputs)}"
            )
        batch = outputs["pred_logits"].shape[0]
        if labels.dim() != 3 or labels.shape[0] != batch:
            raise ValueError(f"Mask2FormerLoss: labels must be [B={batch}, H, W], got {tuple(labels.shape)}")
        device = outputs["pred_masks"].device
        targets = semantic_to_instance_targets(
            labels.to(device, non_blocking=True), self.num_classes, self.ignore_index
        )
        if not self.deep_supervision:
            outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses = self.criterion(outputs, targets)
        return total_loss(losses, self.weight_dict), {k: v.detach() for k, v in losses.items()}
