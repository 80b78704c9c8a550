"""Mask2Former training losses: targets, point sampling, Hungarian matcher, set criterion."""

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dinoseg.eval.segmentation.m2f_loss import (
    HungarianMatcher,
    Mask2FormerLoss,
    SetCriterion,
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
    semantic_to_instance_targets,
    total_loss,
)

NUM_CLASSES = 5
BIG = 30.0  # logit magnitude that makes sigmoid/softmax saturate


def perfect_outputs(filled: torch.Tensor, num_queries: int, num_classes: int = NUM_CLASSES) -> dict:
    """Outputs predicting `filled` [B, H, W] exactly: query k <-> class k, unused queries -> no-object."""
    b = filled.shape[0]
    logits = torch.full((b, num_queries, num_classes + 1), -BIG)
    masks = torch.full((b, num_queries, *filled.shape[1:]), -BIG)
    for i in range(b):
        for q in range(num_queries):
            if q < num_classes and (filled[i] == q).any():
                logits[i, q, q] = BIG
                masks[i, q] = torch.where(filled[i] == q, BIG, -BIG)
            else:
                logits[i, q, num_classes] = BIG
    return {"pred_logits": logits, "pred_masks": masks}


# ---------------------------------------------------------------- targets


def test_targets_from_semantic_map_with_ignore():
    labels = torch.tensor([[[0, 0, 3], [255, 3, 3]], [[1, 1, 1], [1, 1, 1]]])
    t0, t1 = semantic_to_instance_targets(labels, num_classes=NUM_CLASSES, ignore_index=255)
    assert t0["labels"].tolist() == [0, 3] and t0["labels"].dtype == torch.long
    assert t0["masks"].tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 1], [0, 1, 1]]]
    assert t0["valid"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert t1["labels"].tolist() == [1] and t1["masks"].all() and t1["valid"] is None
    # every valid pixel is in exactly one mask, ignored pixels in none
    assert (t0["masks"].sum(0) == t0["valid"].long()).all()


def test_targets_reject_bad_input():
    with pytest.raises(ValueError, match="label 7 outside"):
        semantic_to_instance_targets(torch.tensor([[[0, 7]]]), num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="label -1 outside"):
        semantic_to_instance_targets(torch.tensor([[[0, -1]]]), num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="integer dtype"):
        semantic_to_instance_targets(torch.zeros(1, 2, 2), num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        semantic_to_instance_targets(torch.zeros(2, 2, dtype=torch.long), num_classes=NUM_CLASSES)
    # a custom ignore index is not an error
    (t,) = semantic_to_instance_targets(torch.tensor([[[-1, 2]]]), num_classes=NUM_CLASSES, ignore_index=-1)
    assert t["labels"].tolist() == [2]


# ---------------------------------------------------------------- point sampling


def test_point_sample_hits_pixel_centres_across_resolutions():
    x = torch.randn(2, 3, 4, 6)
    ii, jj = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    coords = torch.stack([(jj + 0.5) / 6, (ii + 0.5) / 4], -1).view(1, -1, 2).expand(2, -1, -1)
    torch.testing.assert_close(point_sample(x, coords), x.flatten(2))
    # the same normalised point on a 4x upsampled (nearest) map reads the same region
    up = F.interpolate(x, scale_factor=4, mode="nearest")
    torch.testing.assert_close(point_sample(up, coords), x.flatten(2))
    assert point_sample(x, torch.rand(2, 5, 7, 2)).shape == (2, 3, 5, 7)


def test_uncertain_points_concentrate_where_logits_are_zero():
    # logits 0 on the vertical line x = 0.5, growing linearly away from it
    ramp = torch.linspace(-1, 1, 64).view(1, 1, 1, 64).expand(3, 1, 64, 64)
    coords = get_uncertain_point_coords_with_randomness(ramp, calculate_uncertainty, 300, 3.0, 0.75)
    assert coords.shape == (3, 300, 2) and coords.min() >= 0 and coords.max() <= 1
    important, random = coords[:, :225, 0], coords[:, 225:, 0]
    # top third of uniform candidates by uncertainty: within ~1/6 of the line (plus sampling noise)
    assert (important - 0.5).abs().max() < 0.22
    assert (random - 0.5).abs().max() > 0.3  # the random quarter still covers the mask
    with pytest.raises(ValueError, match="oversample_ratio"):
        get_uncertain_point_coords_with_randomness(ramp, calculate_uncertainty, 10, 0.5, 0.75)


# ---------------------------------------------------------------- matcher


def reference_cost(matcher, pred_logits, pred_masks, target, coords):
    """Pair-by-pair cost with plain formulas on the matcher's points (no ignore pixels)."""
    prob = pred_logits.softmax(-1)
    out = point_sample(pred_masks[None], coords, padding_mode="border")[0]
    tgt = point_sample(target["masks"].float()[None], coords, padding_mode="border")[0]
    cost = torch.empty(len(out), len(tgt))
    for q in range(len(out)):
        for k in range(len(tgt)):
            bce = F.binary_cross_entropy_with_logits(out[q], tgt[k])
            p = out[q].sigmoid()
            dice = 1 - (2 * (p * tgt[k]).sum() + 1) / (p.sum() + tgt[k].sum() + 1)
            cls = -prob[q, target["labels"][k]]
            cost[q, k] = matcher.cost_class * cls + matcher.cost_mask * bce + matcher.cost_dice * dice
    return cost


@pytest.mark.parametrize("num_queries,num_targets", [(5, 5), (5, 3), (4, 1), (3, 5)])
def test_matcher_equals_brute_force(num_queries, num_targets):
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    for trial in range(5):
        labels = torch.randint(0, NUM_CLASSES, (num_targets,))
        target = {"labels": labels, "masks": torch.rand(num_targets, 12, 10) > 0.5, "valid": None}
        outputs = {
            "pred_logits": torch.randn(1, num_queries, NUM_CLASSES + 1) * 3,
            "pred_masks": torch.randn(1, num_queries, 6, 5) * 3,
        }

        torch.manual_seed(trial)
        cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_masks"][0], target)
        torch.manual_seed(trial)
        coords = torch.rand(1, matcher.num_points, 2)
        torch.testing.assert_close(
            cost, reference_cost(matcher, outputs["pred_logits"][0], outputs["pred_masks"][0], target, coords)
        )

        torch.manual_seed(trial)
        ((rows, cols),) = matcher(outputs, [target])
        assert len(rows) == min(num_queries, num_targets) and len(set(rows.tolist())) == len(rows)
        assert len(set(cols.tolist())) == len(cols)
        c = cost.tolist()
        if num_queries >= num_targets:  # every target gets a distinct query
            best = min(
                sum(c[q][k] for k, q in enumerate(p))
                for p in itertools.permutations(range(num_queries), num_targets)
            )
        else:  # every query gets a distinct target
            best = min(
                sum(c[q][k] for q, k in enumerate(p))
                for p in itertools.permutations(range(num_targets), num_queries)
            )
        assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def test_matcher_finds_the_perfect_assignment_and_handles_no_targets():
    filled = torch.tensor([[0] * 8 + [3] * 8] * 16).unsqueeze(0)
    outputs = perfect_outputs(filled, num_queries=6)
    perm = torch.tensor([4, 0, 5, 1, 3, 2])  # shuffle the queries
    outputs = {k: v[:, perm] for k, v in outputs.items()}
    targets = semantic_to_instance_targets(torch.cat([filled, torch.full_like(filled, 255)]), NUM_CLASSES)
    outputs = {k: v.expand(2, *v.shape[1:]) for k, v in outputs.items()}
    (rows, cols), (rows1, cols1) = HungarianMatcher(num_points=256)(outputs, targets)
    # class 0 was query 0, now at position 1; class 3 was query 3, now at position 4
    assert rows.tolist() == [1, 4] and cols.tolist() == [0, 1]
    assert rows1.numel() == 0 and cols1.numel() == 0


# ---------------------------------------------------------------- criterion


def make_loss(**kwargs) -> Mask2FormerLoss:
    kwargs.setdefault("train_num_points", 256)
    return Mask2FormerLoss(NUM_CLASSES, **kwargs)


def test_perfect_masks_give_near_zero_losses_and_ignore_band_is_not_penalised():
    # image 0: one class; image 1: classes 1 | 4 split by a 2-pixel ignore band that the prediction fills
    # with the neighbouring class, so no sampled point mixes the two classes
    filled = torch.zeros(2, 16, 16, dtype=torch.long)
    filled[0] = 2
    filled[1, :, :8], filled[1, :, 8:] = 1, 4
    labels = filled.clone()
    labels[1, :, 7:9] = 255
    loss_fn = make_loss()
    total, logged = loss_fn(perfect_outputs(filled, num_queries=7), labels)
    for key in ("loss_ce", "loss_mask", "loss_dice"):
        assert logged[key].item() < 1e-4, (key, logged[key])
    assert total.item() < 1e-3

    # masks 4 columns off are far from zero, and so is the perfect prediction if the ignore band were treated
    # as "not this class" (Mask2Former's semantic mapper): the band is what the test isolates
    shifted = filled.clone()
    shifted[1, :, 4:8] = 4
    assert loss_fn(perfect_outputs(shifted, num_queries=7), labels)[1]["loss_mask"] > 1.0
    band_as_class = labels.clone()
    band_as_class[1, :, 7:9] = 3
    assert loss_fn(perfect_outputs(filled, num_queries=7), band_as_class)[1]["loss_mask"] > 0.1


def test_predictions_on_ignored_pixels_do_not_change_the_loss():
    labels = torch.randint(0, NUM_CLASSES, (2, 24, 24))
    labels[:, 4:16, 6:20] = 255
    outputs = {"pred_logits": torch.randn(2, 6, NUM_CLASSES + 1), "pred_masks": torch.randn(2, 6, 24, 24)}
    changed = {k: v.clone() for k, v in outputs.items()}
    # >= 2 px inside the ignored block, so no sampled point interpolates them with a valid pixel
    changed["pred_masks"][:, :, 6:14, 8:18] = torch.randn(2, 6, 8, 10) * 50
    loss_fn = make_loss(importance_sample_ratio=0.0)  # importance sampling looks at the predictions
    torch.manual_seed(1)
    a = loss_fn(outputs, labels)[1]
    torch.manual_seed(1)
    b = loss_fn(changed, labels)[1]
    for key in a:
        torch.testing.assert_close(a[key], b[key])

    # BCE is a mean over valid points only: logits 0 cost log(2) at every point, however much is ignored
    zero = {"pred_logits": outputs["pred_logits"], "pred_masks": torch.zeros(2, 6, 24, 24)}
    assert loss_fn(zero, labels)[1]["loss_mask"].item() == pytest.approx(math.log(2), rel=1e-5)


def test_labels_larger_than_masks_are_sampled_at_their_own_resolution():
    # labels at 64x64, stride-4 predictions at 16x16: left half class 1, top-right class 2, bottom-right class 0
    labels = torch.ones(1, 64, 64, dtype=torch.long)
    labels[0, :32, 32:] = 2
    labels[0, 32:, 32:] = 0
    small = F.interpolate(labels[:, None].float(), size=(16, 16), mode="nearest")[:, 0].long()
    loss_fn = make_loss(importance_sample_ratio=0.0, train_num_points=1024)
    good = loss_fn(perfect_outputs(small, num_queries=5), labels)[1]
    # only points within ~2 target pixels of a class boundary disagree
    assert good["loss_ce"] < 1e-4 and good["loss_dice"] < 0.03 and good["loss_mask"] < 0.1
    # the same masks 2 stride-4 pixels (8 label pixels) off, and what reading the labels in prediction pixel
    # units would call perfect (their top-left 16x16 corner)
    shifted = loss_fn(perfect_outputs(small.roll(2, -1), num_queries=5), labels)[1]
    assert shifted["loss_dice"] > 0.15 and shifted["loss_mask"] > 2.0
    corner = loss_fn(perfect_outputs(labels[:, :16, :16], num_queries=5), labels)[1]
    assert corner["loss_dice"] > 0.5 and corner["loss_mask"] > 5.0


def test_no_object_class_is_down_weighted():
    labels = torch.full((1, 8, 8), 3)
    logits = torch.randn(1, 4, NUM_CLASSES + 1, requires_grad=True)
    masks = torch.full((1, 4, 8, 8), -BIG)
    masks[0, 2] = BIG  # query 2 is the only sensible match for class 3
    outputs = {"pred_logits": logits, "pred_masks": masks}
    matcher = HungarianMatcher(num_points=64)
    criterion = SetCriterion(
        NUM_CLASSES, matcher, {"loss_ce": 1.0}, eos_coef=0.1, losses=("labels",), num_points=64
    )
    targets = semantic_to_instance_targets(labels, NUM_CLASSES)
    loss = criterion(outputs, targets)["loss_ce"]

    classes = torch.tensor([NUM_CLASSES, NUM_CLASSES, 3, NUM_CLASSES])
    ce = -logits[0].log_softmax(-1)[torch.arange(4), classes]
    weights = torch.tensor([0.1, 0.1, 1.0, 0.1])
    torch.testing.assert_close(loss, (weights * ce).sum() / weights.sum())
    assert not torch.allclose(loss, ce.mean())  # the weighting matters for these logits
    loss.backward()
    # unmatched queries are pushed towards no-object, the matched one towards class 3
    assert (logits.grad[0, [0, 1, 3], NUM_CLASSES] < 0).all()
    assert logits.grad[0, 2, 3] < 0 and logits.grad[0, 2, NUM_CLASSES] > 0


def random_outputs(batch=2, queries=6, size=(12, 12), aux=2, requires_grad=True):
    def one():
        return {
            "pred_logits": torch.randn(batch, queries, NUM_CLASSES + 1, requires_grad=requires_grad),
            "pred_masks": torch.randn(batch, queries, *size, requires_grad=requires_grad),
        }

    outputs = one()
    outputs["aux_outputs"] = [one() for _ in range(aux)]
    return outputs


def test_deep_supervision_losses_and_gradients():
    labels = torch.randint(0, NUM_CLASSES, (2, 48, 48))
    labels[0, :10] = 255
    outputs = random_outputs(aux=2)
    loss_fn = make_loss(class_weight=2.0, mask_weight=5.0, dice_weight=5.0)
    total, logged = loss_fn(outputs, labels)
    expected_keys = {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert set(logged) == expected_keys
    weights = {"ce": 2.0, "mask": 5.0, "dice": 5.0}
    manual = sum(weights[k.split("_")[1]] * v for k, v in logged.items())
    torch.testing.assert_close(total.detach(), manual)
    assert all(not v.requires_grad for v in logged.values())

    total.backward()
    for out in [outputs, *outputs["aux_outputs"]]:
        for key in ("pred_logits", "pred_masks"):
            grad = out[key].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key

    no_aux = make_loss(deep_supervision=False)(outputs, labels)[1]
    assert set(no_aux) == {"loss_ce", "loss_mask", "loss_dice"}


def test_all_ignored_images_give_finite_loss_and_gradients():
    outputs = random_outputs(aux=1)
    labels = torch.randint(0, NUM_CLASSES, (2, 16, 16))
    labels[1] = 255  # one image without any target
    total, logged = make_loss()(outputs, labels)
    assert torch.isfinite(total)

    outputs = random_outputs(aux=1)
    total, logged = make_loss()(outputs, torch.full((2, 16, 16), 255))
    assert torch.isfinite(total) and logged["loss_mask"] == 0 and logged["loss_dice"] == 0
    assert logged["loss_ce"] > 0  # every query is still pushed to no-object
    total.backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all() and outputs["pred_logits"].grad.abs().sum() > 0
    assert outputs["pred_masks"].grad is not None  # graph stays connected (DDP)


def test_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 6 * (NUM_CLASSES + 1) + 6 * 64)
    feats = torch.randn(2, 8)
    labels = torch.randint(0, NUM_CLASSES, (2, 32, 32))
    labels[:, :4] = 255
    loss_fn = make_loss()

    def run():
        out = head(feats)
        logits, masks = out[:, : 6 * (NUM_CLASSES + 1)], out[:, 6 * (NUM_CLASSES + 1) :]
        outputs = {"pred_logits": logits.view(2, 6, -1), "pred_masks": masks.view(2, 6, 8, 8)}
        return outputs, loss_fn(outputs, labels)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, (total, _) = run()
    assert outputs["pred_masks"].dtype == torch.bfloat16
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0

    torch.manual_seed(5)
    head.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, (total_bf16, _) = run()
    torch.manual_seed(5)
    _, (total_fp32, _) = run()
    assert total_bf16.item() == pytest.approx(total_fp32.item(), rel=0.05)


def test_num_masks_is_all_reduced_in_a_process_group(tmp_path):
    outputs = random_outputs(aux=0, requires_grad=False)
    labels = torch.randint(0, NUM_CLASSES, (2, 16, 16))
    loss_fn = make_loss()
    torch.manual_seed(3)
    local = loss_fn(outputs, labels)[0]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(3)
        reduced = loss_fn(outputs, labels)[0]
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(reduced, local)


def test_mask_losses_match_the_plain_formulas_without_ignore():
    # no ignore pixels: BCE is the mean over points and dice has +1 smoothing, both divided by num_masks
    labels = torch.randint(0, 3, (1, 8, 8))
    outputs = random_outputs(batch=1, aux=0, size=(8, 8), requires_grad=False)
    criterion = make_loss(importance_sample_ratio=0.0, train_num_points=32).criterion
    targets = semantic_to_instance_targets(labels, NUM_CLASSES)
    torch.manual_seed(7)
    ((rows, cols),) = criterion.matcher(outputs, targets)
    torch.rand(len(rows), 96, 2)  # the oversampled candidates, all dropped with importance_sample_ratio=0
    coords = torch.rand(len(rows), 32, 2)
    torch.manual_seed(7)
    losses = criterion(outputs, targets)
    src = point_sample(outputs["pred_masks"][0, rows][:, None], coords, padding_mode="border")[:, 0]
    tgt = point_sample(targets[0]["masks"][cols].float()[:, None], coords, padding_mode="border")[:, 0]
    num_masks = len(targets[0]["labels"])
    bce = F.binary_cross_entropy_with_logits(src, tgt, reduction="none").mean(1).sum() / num_masks
    p = src.sigmoid()
    dice = (1 - (2 * (p * tgt).sum(1) + 1) / (p.sum(1) + tgt.sum(1) + 1)).sum() / num_masks
    torch.testing.assert_close(losses["loss_mask"], bce)
    torch.testing.assert_close(losses["loss_dice"], dice)


def test_total_loss_and_bad_outputs():
    losses = {"loss_ce": torch.tensor(1.0), "loss_ce_0": torch.tensor(2.0), "loss_dice_3": torch.tensor(4.0)}
    assert total_loss(losses, {"loss_ce": 2.0, "loss_dice": 0.5}).item() == pytest.approx(8.0)
    with pytest.raises(ValueError, match="loss_dice_3"):
        total_loss(losses, {"loss_ce": 2.0})
    loss_fn = make_loss()
    with pytest.raises(ValueError, match="expected num_classes \\+ 1 = 6"):
        loss_fn(
            {"pred_logits": torch.randn(1, 3, 4), "pred_masks": torch.randn(1, 3, 4, 4)},
            torch.zeros(1, 8, 8, dtype=torch.long),
        )
    with pytest.raises(ValueError, match=r"labels must be \[B=1"):
        loss_fn(random_outputs(batch=1), torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(KeyError, match="pred_masks"):
        loss_fn({"pred_logits": torch.randn(1, 3, 6)}, torch.zeros(1, 8, 8, dtype=torch.long))
    assert math.isfinite(loss_fn(random_outputs(batch=1), torch.zeros(1, 8, 8, dtype=torch.long))[0].item())
