"""The detection loss (Plain-DETR's criterion) against the official reference outputs in
tests/fixtures/official/detection, float64 autograd and finite differences, brute-force matching, empty images and
two processes."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision

from dinoseg.engine.optim import TrainingError
from dinoseg.eval.detection.loss import (
    HungarianMatcher,
    SetCriterion,
    build_criterion,
    build_weight_dict,
    sigmoid_focal_loss,
    train_hybrid,
)
from dinoseg.eval.detection.util.box_ops import box_xyxy_to_cxcywh, delta2bbox

FIXTURES = Path(__file__).parent / "fixtures" / "official" / "detection"
INDEX = json.loads((FIXTURES / "index.json").read_text())
NAMES = sorted(INDEX)
TOL = dict(atol=1e-5, rtol=1e-5)


def load(name: str) -> dict:
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


def unflatten(flat: dict) -> dict:
    """The fixture's `train` entries (`aux_outputs.<i>.<key>`, `enc_outputs.<key>`) back into the detector's dict."""
    out = {}
    for key, value in flat.items():
        parts = key.split(".")
        if len(parts) == 1:
            out[key] = value
        elif len(parts) == 2:
            out.setdefault(parts[0], {})[parts[1]] = value
        else:
            layers = out.setdefault(parts[0], [])
            while len(layers) <= int(parts[1]):
                layers.append({})
            layers[int(parts[1])][parts[2]] = value
    return out


def flatten(outputs: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in outputs.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            for i, layer in enumerate(value):
                flat.update(flatten(layer, f"{prefix}{key}.{i}."))
        else:
            flat[prefix + key] = value
    return flat


def fixture_criterion(name: str) -> SetCriterion:
    head, loss = INDEX[name]["head_config"], INDEX[name]["loss"]
    return build_criterion(head["num_classes"], reparam=head["reparam"], dec_layers=head["dec_layers"],
                           aux_loss=head["aux_loss"], two_stage=head["two_stage"], cls_loss_coef=loss["cls_loss_coef"],
                           bbox_loss_coef=loss["bbox_loss_coef"], giou_loss_coef=loss["giou_loss_coef"],
                           set_cost_class=loss["set_cost_class"], set_cost_bbox=loss["set_cost_bbox"],
                           set_cost_giou=loss["set_cost_giou"], focal_alpha=loss["focal_alpha"])


def hybrid_loss(name: str, outputs: dict, targets: list[dict]) -> tuple[dict, torch.Tensor]:
    """The loss dict and the weighted total, as Plain-DETR's training step sums it."""
    criterion = fixture_criterion(name)
    loss = INDEX[name]["loss"]
    loss_dict = train_hybrid(outputs, targets, loss["k_one2many"], criterion, loss["lambda_one2many"])
    total = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
    return loss_dict, total


@pytest.mark.parametrize("name", NAMES)
def test_weight_dict_is_the_fixtures(name):
    assert list(fixture_criterion(name).weight_dict.items()) == list(INDEX[name]["loss"]["weight_dict"].items())


def test_weight_dict_follows_the_head():
    no_aux = build_weight_dict(1.0, 2.0, 3.0, dec_layers=6, aux_loss=False, two_stage=True)
    assert sorted(no_aux) == sorted(f"loss_{n}{s}{m}" for n in ("ce", "bbox", "giou") for s in ("", "_enc")
                                    for m in ("", "_one2many"))
    assert no_aux["loss_bbox_enc_one2many"] == 2.0 and no_aux["loss_giou"] == 3.0
    six = build_weight_dict(dec_layers=6, two_stage=False)
    assert "loss_ce_4" in six and "loss_ce_5" not in six and "loss_ce_enc" not in six and six["loss_bbox_4_one2many"] == 5.0


@pytest.mark.parametrize("name", NAMES)
def test_every_loss_entry_and_total_match_the_official(name):
    data = load(name)
    loss_dict, total = hybrid_loss(name, unflatten(data["train"]), data["targets"])
    assert sorted(loss_dict) == INDEX[name]["loss_keys"]
    for key, value in loss_dict.items():
        torch.testing.assert_close(value, data["loss"][key], **TOL, msg=key)
    torch.testing.assert_close(total, data["loss"]["total"], **TOL)


def leaves(name: str, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype).requires_grad_() for k, v in load(name)["train"].items()}


@pytest.mark.parametrize("name", NAMES)
def test_gradient_wrt_outputs_matches_float64_and_finite_differences(name):
    targets = load(name)["targets"]
    grads = {}
    for dtype in (torch.float32, torch.float64):
        flat = leaves(name, dtype)
        _, total = hybrid_loss(name, unflatten(flat), [{k: v.to(dtype) if v.is_floating_point() else v
                                                       for k, v in t.items()} for t in targets])
        total.backward()
        grads[dtype] = {k: v.grad for k, v in flat.items()}
    # Every output the loss reads gets a gradient (class, boxes, and with reparam the deltas and reference boxes).
    assert all(g is not None and g.abs().sum() > 0 for g in grads[torch.float32].values())
    for key, grad in grads[torch.float32].items():
        torch.testing.assert_close(grad.double(), grads[torch.float64][key], **TOL, msg=key)

    # The float64 gradient is the derivative: central differences along random directions.
    flat = {k: v.detach() for k, v in leaves(name, torch.float64).items()}
    targets64 = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in flat.items()}
        norm = math.sqrt(sum(float((d * d).sum()) for d in direction.values()))
        direction = {k: d / norm for k, d in direction.items()}
        eps = 1e-3
        plus = hybrid_loss(name, unflatten({k: v + eps * direction[k] for k, v in flat.items()}), targets64)[1]
        minus = hybrid_loss(name, unflatten({k: v - eps * direction[k] for k, v in flat.items()}), targets64)[1]
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((grads[torch.float64][k] * direction[k]).sum() for k in flat)
        torch.testing.assert_close(numeric, analytic, atol=1e-3, rtol=1e-3)


def test_sigmoid_focal_loss_is_torchvisions_averaged_over_queries():
    logits = torch.randn(2, 5, 3)
    labels = (torch.rand(2, 5, 3) > 0.7).float()
    expected = torchvision.ops.sigmoid_focal_loss(logits, labels, alpha=0.3, gamma=2, reduction="none").mean(1).sum() / 4
    torch.testing.assert_close(sigmoid_focal_loss(logits, labels, 4, alpha=0.3), expected)
    unweighted = torchvision.ops.sigmoid_focal_loss(logits, labels, alpha=-1, gamma=1.5, reduction="none").mean(1).sum()
    torch.testing.assert_close(sigmoid_focal_loss(logits, labels, 1, alpha=-1, gamma=1.5), unweighted)


# ---- random cases: matcher optimality, empty images, two processes -------------------------------------------

def random_targets(counts: list[int], reparam: bool, generator: torch.Generator, num_classes: int = 4) -> list[dict]:
    targets = []
    for n in counts:
        centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        boxes = torch.cat([centre, size], dim=1) * (64.0 if reparam else 1.0)
        targets.append({"labels": torch.randint(num_classes, (n,), generator=generator), "boxes": boxes})
    return targets


def random_layer(batch: int, queries: int, reparam: bool, generator: torch.Generator, num_classes: int = 4) -> dict:
    """One layer's outputs as the detector gives them: boxes in (0, 1), or with reparam in pixels from deltas
    applied to reference boxes."""
    logits = torch.randn(batch, queries, num_classes, generator=generator)
    if not reparam:
        return {"pred_logits": logits, "pred_boxes": torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.2}
    references = torch.cat([torch.rand(batch, queries, 2, generator=generator) * 40 + 12,
                            torch.rand(batch, queries, 2, generator=generator) * 20 + 4], dim=-1)
    deltas = torch.randn(batch, queries, 4, generator=generator) * 0.3
    boxes = box_xyxy_to_cxcywh(delta2bbox(references, deltas))
    return {"pred_logits": logits, "pred_boxes": boxes, "pred_boxes_old": references, "pred_deltas": deltas}


def random_outputs(batch: int, reparam: bool, generator: torch.Generator, queries: int = 6) -> dict:
    """A hybrid detector's training outputs: one-to-one and one-to-many queries, one auxiliary layer, proposals."""
    one2one, one2many = random_layer(batch, queries, reparam, generator), random_layer(batch, 2 * queries, reparam, generator)
    outputs = dict(one2one)
    outputs.update({f"{k}_one2many": v for k, v in one2many.items()})
    outputs["aux_outputs"] = [random_layer(batch, queries, reparam, generator)]
    outputs["aux_outputs_one2many"] = [random_layer(batch, 2 * queries, reparam, generator)]
    outputs["enc_outputs"] = random_layer(batch, 20, reparam, generator)
    return outputs


def reference_cost(layer: dict, image: int, query: int, target: dict, t: int, costs: tuple, reparam: bool) -> float:
    """Plain-DETR's matching cost of one (query, target) pair, written out on scalars."""
    p = float(layer["pred_logits"][image, query, int(target["labels"][t])].sigmoid())
    focal = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
    cx, cy, w, h = layer["pred_boxes"][image, query].tolist()
    gx, gy, gw, gh = target["boxes"][t].tolist()
    if reparam:
        px, py, pw, ph = layer["pred_boxes_old"][image, query].tolist()
        pw, ph = pw + 0.1, ph + 0.1
        wanted = [(gx - px) / pw, (gy - py) / ph, math.log(gw / pw), math.log(gh / ph)]
        l1 = sum(abs(a - b) for a, b in zip(layer["pred_deltas"][image, query].tolist(), wanted))
    else:
        l1 = abs(cx - gx) + abs(cy - gy) + abs(w - gw) + abs(h - gh)
    a = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    b = (gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2)
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = w * h + gw * gh - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    giou = inter / union - (hull - union) / hull
    return costs[0] * focal + costs[1] * l1 - costs[2] * giou


@pytest.mark.parametrize(("reparam", "queries", "counts"), [(False, 5, [3, 0, 6]), (True, 5, [3, 0, 6]),
                                                            (True, 4, [4])])  # last: as many targets as queries
def test_matcher_finds_the_cheapest_assignment(reparam, queries, counts):
    generator = torch.Generator().manual_seed(len(counts) + reparam)
    layer = {k: v.double() for k, v in random_layer(len(counts), queries, reparam, generator).items()}
    targets = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()}
               for t in random_targets(counts, reparam, generator)]
    costs = (2.0, 5.0, 2.0)
    matcher = HungarianMatcher(*costs, cost_bbox_type="reparam" if reparam else "l1")
    indices = matcher(layer, targets)
    for image, ((rows, cols), target) in enumerate(zip(indices, targets)):
        n = len(target["labels"])
        assert rows.dtype == cols.dtype == torch.int64 and len(rows) == len(cols) == min(queries, n)
        table = [[reference_cost(layer, image, q, target, t, costs, reparam) for t in range(n)] for q in range(queries)]
        found = sum(table[q][t] for q, t in zip(rows.tolist(), cols.tolist()))
        if n <= queries:
            best = min(sum(table[q][t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(queries), n))
        else:
            best = min(sum(table[q][t] for q, t in enumerate(perm)) for perm in itertools.permutations(range(n), queries))
        assert found == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("reparam", [False, True])
def test_images_without_boxes(reparam):
    generator = torch.Generator().manual_seed(3)
    criterion = build_criterion(4, reparam=reparam, dec_layers=2)
    for counts in ([0, 2], [0, 0]):
        flat = {k: v.requires_grad_() for k, v in flatten(random_outputs(len(counts), reparam, generator)).items()}
        loss_dict = train_hybrid(unflatten(flat), random_targets(counts, reparam, generator), 3, criterion, 1.0)
        assert all(torch.isfinite(v) for v in loss_dict.values())
        total = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
        total.backward()
        assert all(torch.isfinite(v.grad).all() for v in flat.values() if v.grad is not None)
        if counts == [0, 0]:
            # No box to regress; every query learns "no object", over num_boxes clamped at 1; nothing matched.
            assert all(v == 0 for k, v in loss_dict.items() if k.startswith(("loss_bbox", "loss_giou")))
            p = flat["pred_logits"].detach().sigmoid()
            torch.testing.assert_close(loss_dict["loss_ce"], (0.75 * p**2 * -torch.log1p(-p)).sum())
            assert loss_dict["class_error"] == 100 and loss_dict["class_error_one2many"] == 100
        else:
            assert loss_dict["loss_bbox"] > 0 and loss_dict["loss_giou_enc"] > 0 and loss_dict["loss_bbox_0_one2many"] > 0


def test_half_precision_outputs_are_matched_and_summed_in_float32():
    generator = torch.Generator().manual_seed(5)
    flat = {k: v.bfloat16().requires_grad_() for k, v in flatten(random_outputs(2, True, generator)).items()}
    targets = random_targets([2, 3], True, generator)
    criterion = build_criterion(4, reparam=True, dec_layers=2)
    half = train_hybrid(unflatten(flat), targets, 2, criterion, 1.0)
    full = train_hybrid(unflatten({k: v.detach().float() for k, v in flat.items()}), targets, 2, criterion, 1.0)
    for key, value in half.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, full[key], atol=0, rtol=0, msg=key)
    sum(half[k] * criterion.weight_dict[k] for k in half if k in criterion.weight_dict).backward()
    assert flat["pred_deltas"].grad.dtype == torch.bfloat16 and flat["pred_deltas"].grad.abs().sum() > 0


def test_bad_settings_and_targets_fail_clearly():
    with pytest.raises(ValueError, match="cost_bbox_type='giou'"):
        HungarianMatcher(cost_bbox_type="giou")
    with pytest.raises(ValueError, match="all 0"):
        HungarianMatcher(0, 0, 0)
    with pytest.raises(ValueError, match="unknown losses \\['masks'\\]"):
        SetCriterion(4, HungarianMatcher(), {}, ["labels", "masks"])
    generator = torch.Generator().manual_seed(4)
    outputs = random_outputs(2, False, generator)
    targets = random_targets([1, 2], False, generator)
    with pytest.raises(ValueError, match="k_one2many=0"):
        train_hybrid(outputs, targets, 0, build_criterion(4, reparam=False, dec_layers=2), 1.0)
    with pytest.raises(TrainingError, match=r"labels \[4\] outside \[0, num_classes=4\)"):
        build_criterion(4, reparam=False, dec_layers=2)(outputs, [targets[0], {**targets[1], "labels": torch.tensor([1, 4])}])
    with pytest.raises(TrainingError, match="no pred_deltas / pred_boxes_old"):
        build_criterion(4, reparam=True, dec_layers=2)(outputs, targets)
    nan = {**outputs, "pred_boxes": torch.full_like(outputs["pred_boxes"], float("nan"))}
    with pytest.raises(TrainingError, match="HungarianMatcher: image 0"):
        build_criterion(4, reparam=False, dec_layers=2)(nan, targets)


# ---- several processes -----------------------------------------------------------------------------------------

def test_num_boxes_is_averaged_over_processes(monkeypatch):
    """A world of 2 processes (the collective mocked: a real 2-process run costs ~20 s of imports): this process
    holds 2 boxes, the other 6, so every loss is divided by 4 instead of 2."""
    import torch.distributed as dist

    from dinoseg.engine import distributed

    generator = torch.Generator().manual_seed(10)
    outputs, targets = random_outputs(2, True, generator), random_targets([1, 1], True, generator)
    criterion = build_criterion(4, reparam=True, dec_layers=2)
    alone = criterion(outputs, targets)

    reduced = []

    def all_reduce(tensor, op=None):
        assert op == dist.ReduceOp.SUM
        reduced.append(tensor.tolist())
        tensor += 6.0  # the other process's boxes

    monkeypatch.setattr(distributed, "is_enabled", lambda: True)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    together = criterion(outputs, targets)
    assert reduced == [[2.0]]  # once per call, this process's count
    assert sorted(together) == sorted(alone)
    for key, value in alone.items():
        expected = value * 2 / 4 if key.startswith("loss_") else value  # class and cardinality errors are counts
        torch.testing.assert_close(together[key], expected, msg=key)

    # Fewer boxes than processes in the whole world: at least 1.
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: tensor)
    empty = [{**t, "labels": t["labels"][:0], "boxes": t["boxes"][:0]} for t in targets]
    torch.testing.assert_close(criterion(outputs, empty)["loss_ce"], build_criterion(4, reparam=True, dec_layers=2)
                               .loss_labels(outputs, empty, [(torch.zeros(0, dtype=torch.int64),) * 2] * 2, 1.0)["loss_ce"])


# ---- the official detector's parameter gradients ----------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_parameter_gradients_match_the_official(name):
    """Build the fixture's detector (the official `build_model(backbone, DetectionHeadConfig)`), run its training
    forward, the hybrid loss and backward: the head's gradients are the official ones."""
    detr = pytest.importorskip("dinoseg.eval.detection.models.detr")
    if not hasattr(detr, "build_model"):
        pytest.skip("dinoseg.eval.detection.models.detr.build_model is not there yet")
    config_module = pytest.importorskip("dinoseg.eval.detection.config")
    encoding = pytest.importorskip("dinoseg.eval.detection.models.position_encoding")
    from dinoseg.models.vision_transformer import DinoVisionTransformer

    meta, data = INDEX[name], load(name)
    head = dict(meta["head_config"], position_embedding=encoding.PositionEncoding[meta["head_config"]["position_embedding"]])
    backbone = DinoVisionTransformer(**meta["backbone_kwargs"])
    detector = detr.build_model(backbone, config_module.DetectionHeadConfig(**head))
    detector.load_state_dict(data["state_dict"], strict=True)
    detector.train()
    backbone.eval()  # frozen backbone in eval mode, head in training mode
    outputs = detector(list(data["images"]))
    flat = flatten(outputs)
    assert sorted(flat) == sorted(data["train"])
    for key, value in flat.items():
        torch.testing.assert_close(value, data["train"][key], **TOL, msg=key)

    loss_dict, total = hybrid_loss(name, outputs, data["targets"])
    torch.testing.assert_close(total, data["loss"]["total"], **TOL)
    total.backward()
    parameters = dict(detector.named_parameters())
    expected = {k.removeprefix("grad."): v for k, v in data["loss"].items() if k.startswith("grad.")}
    assert expected
    for key, grad in expected.items():
        torch.testing.assert_close(parameters[key].grad, grad, **TOL, msg=key)
