"""The official DINOv3 call forms, executed as an official user writes them (positional order, official keywords,
official defaults), each compared with dinoseg's keyword form on fixture models (atol 1e-6), and the official module
paths with `dinov3` replaced by `dinoseg`."""

import contextlib
import importlib
import inspect
import logging
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dinoseg
from dinoseg.data.datasets.base import reduce_zero_label
from dinoseg.engine.schedulers import one_cycle_momentum
from dinoseg.eval.segmentation.eval import evaluate_segmentation_model
from dinoseg.eval.segmentation.inference import (
    InferenceSettings,
    make_inference,
    mask_classification_to_semantic,
    slide_crop_boxes,
    slide_inference,
    tta_image_size,
)
from dinoseg.eval.segmentation.loss import MultiSegmentationLoss
from dinoseg.eval.segmentation.metrics import (
    calculate_intersect_and_union,
    calculate_segmentation_metrics,
    total_area_to_metrics,
)
from dinoseg.eval.segmentation.models import FeatureDecoder, build_segmentation_decoder
from dinoseg.eval.segmentation.models.backbone.dinov3_adapter import DINOv3_Adapter
from dinoseg.eval.segmentation.models.heads.mask2former_head import Mask2FormerHead
from dinoseg.eval.segmentation.schedulers import build_scheduler
from dinoseg.eval.segmentation.transforms import (
    OFFICIAL_MEAN,
    OFFICIAL_STD,
    make_segmentation_eval_transforms,
    make_segmentation_train_transforms,
    make_single_view_eval_transforms,
)
from dinoseg.eval.utils import BackboneLayersSet, ModelWithIntermediateLayers
from dinoseg.hub.segmentors import SegmentorWeights, dinov3_vit7b16_ms
from dinoseg.models import CheckpointError
from dinoseg.models.backbones import Weights

from .conftest import load_fixture
from .test_linear_head import official_segmentor, tiny_backbone
from .test_m2f import SMALL, TINY_7B, TINY_HEAD, loaded

ATOL = dict(atol=1e-6, rtol=0)
LINEAR = "linear_last_on_vit_mlp.pt"
softmax = partial(F.softmax, dim=1)


@pytest.fixture(scope="module")
def linear(official_index):
    segmentor, ref = official_segmentor(official_index, LINEAR)
    entry = official_index[LINEAR]
    return segmentor, ref, (entry["crop_size"],) * 2, (entry["stride"],) * 2


@pytest.fixture(scope="module")
def m2f(official_index):
    return loaded(official_index, SMALL, load_fixture(SMALL))


class Counting(nn.Module):
    """Counts the segmentor's predict calls and records their input shapes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def predict(self, x, rescale_to):
        self.calls.append(tuple(x.shape))
        return self.model.predict(x, rescale_to=rescale_to)


# -- inference --------------------------------------------------------------------------------------------------------

def test_slide_inference_official_form(linear):
    segmentor, ref, crop, stride = linear
    x = ref["slide_x"]
    # The form the official make_inference uses: decoder_head_type third, the rest by keyword.
    official = slide_inference(x, segmentor, "linear", n_output_channels=7, crop_size=crop, stride=stride,
                               num_max_forward=1)
    positional = slide_inference(x, segmentor, "linear", 7, crop, stride, 1)
    ours = slide_inference(x, segmentor, crop_size=crop, stride=stride, crop_batch_size=3)
    torch.testing.assert_close(official, ours, **ATOL)
    torch.testing.assert_close(positional, ours, **ATOL)
    torch.testing.assert_close(official, ref["slide_logits"], atol=1e-5, rtol=1e-5)  # the official numbers


def test_make_inference_official_form(linear):
    segmentor, ref, crop, stride = linear
    x = ref["slide_x"]
    size = (2 * x.shape[-2], 2 * x.shape[-1])
    # The call of the official evaluate_segmentation_model, then the same fully positional.
    official = make_inference(x, segmentor, inference_mode="slide", decoder_head_type="linear", rescale_to=size,
                              n_output_channels=7, crop_size=crop, stride=stride, apply_horizontal_flip=True,
                              output_activation=softmax)
    positional = make_inference(x, segmentor, "slide", "linear", size, 7, crop, stride, True, 1, softmax)
    ours = make_inference(x, segmentor, "slide", rescale_to=size, crop_size=crop, stride=stride,
                          apply_horizontal_flip=True, output_activation=softmax, crop_batch_size=1)
    torch.testing.assert_close(official, ours, **ATOL)
    torch.testing.assert_close(positional, ours, **ATOL)
    torch.testing.assert_close(official, ref["slide_flipped_softmax_2x"], atol=1e-5, rtol=1e-5)
    # Whole mode: the official size is 512 x 512 whatever the input.
    counting = Counting(segmentor)
    whole = make_inference(x, counting, "whole", "linear", (40, 56), 7)
    assert counting.calls == [(1, 3, 512, 512)]
    resized = F.interpolate(x, size=(512, 512), mode="bilinear", align_corners=False)
    torch.testing.assert_close(whole, segmentor.predict(resized, rescale_to=(40, 56)), **ATOL)


def test_decoder_head_type_m2f_converts_as_officially(m2f):
    x = torch.randn(1, 3, 64, 96)
    crop, stride = (64, 64), (32, 32)
    official = slide_inference(x, m2f, "m2f", n_output_channels=7, crop_size=crop, stride=stride)
    # The official conversion, per crop: class softmax without "no object" x mask sigmoid, in bfloat16.
    expected = torch.zeros(1, 7, 64, 96)
    count = torch.zeros(1, 1, 64, 96)
    for y1, y2, x1, x2 in slide_crop_boxes(64, 96, crop, stride):
        out = m2f.predict(x[..., y1:y2, x1:x2], rescale_to=(y2 - y1, x2 - x1))
        cls = out["pred_logits"].softmax(-1)[..., :-1].to(torch.bfloat16)
        scores = torch.einsum("bqc,bqhw->bchw", cls, out["pred_masks"].sigmoid().to(torch.bfloat16))
        expected[..., y1:y2, x1:x2] += scores.float()
        count[..., y1:y2, x1:x2] += 1
    # Equal up to one bfloat16 rounding step: a batched bfloat16 einsum may round differently from a per-crop one.
    torch.testing.assert_close(official, expected / count, atol=2**-7, rtol=2**-7)
    # Without the type (the official default "linear"), Mask2Former outputs are recognised and kept in float32.
    ours = slide_inference(x, m2f, crop_size=crop, stride=stride)
    assert not torch.equal(ours, official)
    torch.testing.assert_close(ours, official, atol=1e-2, rtol=1e-2)
    # Whole mode converts in float32 (as officially).
    whole = make_inference(x, m2f, "whole", "m2f", (64, 96), 7, (64, 96))
    out = m2f.predict(x, rescale_to=(64, 96))
    torch.testing.assert_close(whole, mask_classification_to_semantic(out["pred_logits"], out["pred_masks"]), **ATOL)
    with pytest.raises(TypeError, match="returned a tensor"):
        slide_inference(x, lambda_model(), "m2f", crop_size=crop, stride=stride)


def lambda_model():
    class Linear(nn.Module):
        def predict(self, x, rescale_to):
            return F.interpolate(x, size=tuple(rescale_to))

    return Linear()


def test_num_max_forward_pads_model_calls_as_officially(linear):
    segmentor, ref, crop, stride = linear
    x = ref["slide_x"]
    n_crops = len(slide_crop_boxes(*x.shape[-2:], crop, stride))
    counting = Counting(segmentor)
    padded = slide_inference(x, counting, "linear", 7, crop, stride, n_crops + 3, crop_batch_size=1)
    # One call per crop (crop_batch_size=1, the official way), then zero crops up to num_max_forward.
    assert len(counting.calls) == n_crops + 3 and counting.calls[-1] == (1, 3, *crop)
    torch.testing.assert_close(padded, ref["slide_logits"], atol=1e-5, rtol=1e-5)
    counting.calls.clear()
    slide_inference(x, counting, "linear", 7, crop, stride, 1, crop_batch_size=1)
    assert len(counting.calls) == n_crops  # the official default adds nothing


def test_slide_inference_says_what_its_third_argument_is(linear):
    segmentor, ref, crop, stride = linear
    with pytest.raises(TypeError, match="third argument of slide_inference is decoder_head_type"):
        slide_inference(ref["slide_x"], segmentor, crop, stride)
    with pytest.raises(ValueError, match="unknown decoder_head_type 'dpt'"):
        slide_inference(ref["slide_x"], segmentor, "dpt")


# -- models -----------------------------------------------------------------------------------------------------------

def test_build_segmentation_decoder_official_form():
    torch.manual_seed(0)
    backbone = tiny_backbone()
    x = torch.randn(1, 3, 32, 48)
    # Official positional order: backbone, layers, decoder_type, hidden_dim, num_classes, dropout, autocast_dtype.
    official = build_segmentation_decoder(backbone, BackboneLayersSet.FOUR_LAST, "linear", 2048, 5, 0.1, torch.float32)
    ours = build_segmentation_decoder(backbone, backbone_out_layers="FOUR_LAST", num_classes=5)
    ours.load_state_dict(official.state_dict(), strict=True)
    torch.testing.assert_close(official.eval().predict(x, (32, 48)), ours.eval().predict(x, (32, 48)), **ATOL)
    default = build_segmentation_decoder(backbone)  # official defaults: linear, FOUR_EVEN_INTERVALS, 150 classes
    assert type(default.segmentation_model[1]).__name__ == "LinearHead"
    assert default.segmentation_model[1].conv.weight.shape[:2] == (150, 4 * 32)


def test_feature_decoder_official_autocast_ctx():
    torch.manual_seed(0)
    reference = build_segmentation_decoder(tiny_backbone(), "LAST", "linear", num_classes=4).eval()
    modules = reference.segmentation_model
    x = torch.randn(2, 3, 32, 32)
    # Official: FeatureDecoder(ModuleList, autocast_ctx) with a context factory (here the CPU twin of theirs).
    official = FeatureDecoder(modules, partial(torch.autocast, device_type="cpu", dtype=torch.bfloat16, enabled=True))
    ours = FeatureDecoder(modules, autocast_dtype=torch.bfloat16)
    torch.testing.assert_close(official.predict(x, rescale_to=(32, 32)), ours.predict(x, rescale_to=(32, 32)), **ATOL)
    torch.testing.assert_close(official(x), ours(x), **ATOL)
    plain = FeatureDecoder(modules, contextlib.nullcontext)
    torch.testing.assert_close(plain.predict(x, (32, 32)), reference.predict(x, (32, 32)), **ATOL)
    with pytest.raises(ValueError, match="not both"):
        FeatureDecoder(modules, contextlib.nullcontext, autocast_dtype=torch.bfloat16)


def test_model_with_intermediate_layers_official_defaults():
    torch.manual_seed(0)
    backbone = tiny_backbone().eval()
    x = torch.randn(1, 3, 32, 48)
    official = ModelWithIntermediateLayers(backbone, [1, 3], contextlib.nullcontext)(x)
    expected = backbone.get_intermediate_layers(x, n=[1, 3], reshape=False, return_class_token=True)
    ours = ModelWithIntermediateLayers(backbone, n=[1, 3], reshape=False, return_class_token=True)(x)
    for got, mine, want in zip(official, ours, expected):  # (patch tokens [B, N, C], class token [B, C]) per layer
        assert got[0].shape == (1, 6, 32) and got[1].shape == (1, 32)
        for a, b, c in zip(got, mine, want):
            torch.testing.assert_close(a, b, **ATOL)
            torch.testing.assert_close(a, c, **ATOL)


def test_mask2former_head_official_input_shape():
    embed, patch = 32, 16
    # The official builder's ShapeSpecs: [channels, height, width, stride] by level name.
    input_shape = {"1": [embed, patch * 4, patch * 4, 4], "2": [embed, patch * 2, patch * 2, 4],
                   "3": [embed, patch, patch, 4], "4": [embed, patch // 2, patch // 2, 4]}
    options = dict(num_queries=4, nheads=2, dim_feedforward=32, enc_layers=1, dec_layers=2, pixel_decoder_nheads=2)
    torch.manual_seed(0)
    official = Mask2FormerHead(input_shape, 32, 5, 1.0, 255, "multi_scale_pixel_decoder", **options).eval()
    torch.manual_seed(0)
    ours = Mask2FormerHead([embed] * 4, hidden_dim=32, num_classes=5, **options).eval()
    assert official.ignore_value == 255 and official.loss_weight == 1.0
    features = {str(i + 1): torch.randn(1, embed, 64 // s, 64 // s) for i, s in enumerate((4, 8, 16, 32))}
    a, b = official.predict(features, None, rescale_to=(64, 64)), ours.predict(features, rescale_to=(64, 64))
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(a[key], b[key], **ATOL)


def test_dinov3_adapter_official_positional_form():
    torch.manual_seed(0)
    backbone = tiny_backbone()
    # Official order: backbone, interaction_indexes, pretrain_size, conv_inplane, n_points, deform_num_heads,
    # drop_path_rate, init_values, with_cffn, cffn_ratio, deform_ratio, add_vit_feature, use_extra_extractor, with_cp.
    official = DINOv3_Adapter(backbone, [0, 1, 2, 3], 512, 16, 4, 4, 0.0, 0.0, True, 0.25, 0.5, True, True, False)
    ours = DINOv3_Adapter(backbone, interaction_indexes=[0, 1, 2, 3], conv_inplane=16, deform_num_heads=4,
                          drop_path_rate=0.0, with_cp=False)
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    a, b = official.eval()(x), ours.eval()(x)
    for key in a:
        torch.testing.assert_close(a[key], b[key], **ATOL)
    assert official.pretrain_size == (512, 512) and official.init_values == 0.0


# -- metrics, loss, schedules -------------------------------------------------------------------------------------------

def test_metrics_official_forms():
    ref = load_fixture("metrics.pt")
    expected = ref["reduce_zero_label=True"]
    pred, label = ref["pred"], ref["label"]
    official = calculate_intersect_and_union(pred, label, 7, 255, True)  # positional, as the official code allows
    ours = calculate_intersect_and_union(pred, label, num_classes=7, ignore_index=255, reduce_zero_label=True,
                                         strict=True)
    assert torch.equal(official, ours)
    torch.testing.assert_close(official.float(), expected["intersect_union_pred_label"], atol=0, rtol=0)
    # The official evaluation's call: a stack of per-image areas and the three metric groups, positionally.
    results = calculate_segmentation_metrics(torch.stack([official, official]), ["mIoU", "dice", "fscore"], 1)
    mine = calculate_segmentation_metrics(official)
    for key in ("mIoU", "acc", "aAcc", "dice", "fscore", "precision", "recall"):
        torch.testing.assert_close(results[key], mine[key], **ATOL)
        torch.testing.assert_close(results[key].float(), expected[key], atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="not supported"):
        calculate_segmentation_metrics(official, ["mAP"])
    per_class = total_area_to_metrics(*official, ["mIoU", "dice"], 1)
    assert list(per_class) == ["aAcc", "mIoU", "acc", "dice"]
    torch.testing.assert_close(per_class["mIoU"].nanmean().float(), expected["mIoU"], atol=1e-5, rtol=0)


def test_multi_segmentation_loss_official_form():
    logits, target = torch.randn(2, 5, 8, 8), torch.randint(0, 5, (2, 8, 8))
    target[0, 0] = 255
    official = MultiSegmentationLoss(0.0, 1.0)(logits, target)  # (diceloss_weight, celoss_weight)
    ours = MultiSegmentationLoss(diceloss_weight=0.0, celoss_weight=1.0, ignore_index=255)(logits, target)
    torch.testing.assert_close(official, ours, **ATOL)
    torch.testing.assert_close(official, F.cross_entropy(logits, target, ignore_index=255), atol=1e-6, rtol=1e-6)
    params = inspect.signature(MultiSegmentationLoss).parameters
    assert [(p.name, p.default) for p in list(params.values())[:2]] == [("diceloss_weight", 0.0), ("celoss_weight", 0.0)]
    with pytest.raises(ValueError, match="both 0"):  # the official defaults build a loss that fails when called
        MultiSegmentationLoss()


def _lrs_and_betas(scheduler_type, kwargs, steps=12, lr=1e-3, total=10):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.999))
    sched = build_scheduler(scheduler_type, opt, lr, total, kwargs)
    out = []
    for _ in range(min(steps, total)):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]))
        opt.step()
        sched.step()
    return out


def test_build_scheduler_official_form_and_keywords():
    # The official linear recipe's constructor_kwargs, as its train.py passes them.
    official = {"warmup_iters": 3, "warmup_ratio": 1e-6, "final_div_factor": float("inf"), "pct_start": 0,
                "anneal_strategy": "cos", "use_beta1": False, "update_momentum": False}
    ours = {"warmup_iters": 3, "warmup_ratio": 1e-6, "final_div_factor": float("inf"), "use_beta1": False}
    a = _lrs_and_betas("WarmupOneCycleLR", official)
    b = _lrs_and_betas("WarmupOneCycleLR", ours)
    assert a == b and all(betas == (0.9, 0.999) for _, betas in a)
    # Official defaults (no kwargs): warmup_ratio 0, final_div_factor 1000, and beta1 follows the momentum schedule:
    # 0 during the warmup, then annealed from 0.85 to 0.95.
    default = _lrs_and_betas("WarmupOneCycleLR", {"warmup_iters": 2})
    betas = [b1 for _, (b1, _) in default]
    assert betas[:2] == [0.0, 0.0]
    expected = [0.95 + (0.85 - 0.95) / 2 * (1 + math.cos(math.pi * (k - 2) / 8)) for k in range(2, 10)]
    assert betas[2:] == pytest.approx(expected) and betas[2] == pytest.approx(0.85)
    assert [one_cycle_momentum(k, 10, warmup_iters=2) for k in range(10)] == pytest.approx(betas)
    lrs = [lr for lr, _ in default]
    assert lrs[0] == pytest.approx(1e-3 / 1000)  # max_lr / final_div_factor at step 0 (warmup_ratio 0)
    assert lrs[-1] == pytest.approx(1e-3 / 25 / 1000, rel=1e-9)  # cosine down to max_lr / div / final_div at the end
    # Linear annealing after the warmup: max_lr -> min_lr linearly in step / total.
    linear = [lr for lr, _ in _lrs_and_betas("WarmupOneCycleLR", {"anneal_strategy": "linear", "use_beta1": False})]
    min_lr = 1e-3 / 25 / 1000
    assert linear == pytest.approx([1e-3 + (min_lr - 1e-3) * k / 10 for k in range(10)])
    with pytest.raises(ValueError, match="unknown scheduler_type 'OneCycleLR'"):
        _lrs_and_betas("OneCycleLR", {})


# -- evaluation ---------------------------------------------------------------------------------------------------------

class _Pairs(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_evaluate_segmentation_model_official_form(linear):
    segmentor, ref, crop, stride = linear
    torch.manual_seed(0)
    images = [torch.randn(3, 80, 112), torch.randn(3, 64, 96)]
    raw = [torch.randint(0, 8, im.shape[-2:]) for im in images]  # ADE20K-style: 0 = ignored, 1..7 = classes
    # Official batches: (views, (index, label)), one image per batch, its views a list.
    official_loader = [([im[None]], (torch.tensor([i]), lab[None])) for i, (im, lab) in enumerate(zip(images, raw))]
    official = evaluate_segmentation_model(segmentor, official_loader, "cpu", crop[0], stride[0], "linear", 7,
                                           torch.float32)
    assert set(official) == {"mIoU", "acc", "aAcc", "dice", "fscore", "precision", "recall"}
    # dinoseg's form: train-id labels from its loader, InferenceSettings.
    pairs = _Pairs([(im, reduce_zero_label(lab)) for im, lab in zip(images, raw)])
    loader = torch.utils.data.DataLoader(pairs, batch_size=1)
    settings = InferenceSettings(crop_size=crop, stride=stride)
    ours = evaluate_segmentation_model(segmentor, loader, torch.device("cpu"), num_classes=7, settings=settings,
                                       progress=False)
    names = {"mIoU": "mIoU", "acc": "mAcc", "aAcc": "aAcc", "dice": "mDice", "fscore": "mFscore",
             "precision": "mPrecision", "recall": "mRecall"}  # fmt: skip
    for key, name in names.items():
        assert official[key] == round(ours[name] * 100, 2), key
    # TTA views (scales, then flips) from the official transform are averaged, the second half flipped back.
    tta = make_segmentation_eval_transforms(img_size=64, inference_mode="slide", use_tta=True, tta_ratios=[0.75, 1.0])
    views, label = tta(((images[0] * 40 + 128).clamp(0, 255)).to(torch.uint8), raw[0])
    assert len(views) == 4 and torch.equal(views[2], views[0].flip(-1))
    result = evaluate_segmentation_model(segmentor, [([v[None] for v in views], (0, label[None]))], "cpu",
                                         crop[0], stride[0], "linear", 7, None)
    assert 0 <= result["mIoU"] <= 100
    with pytest.raises(TypeError, match="settings="):
        evaluate_segmentation_model(segmentor, loader, "cpu")


# -- transforms ---------------------------------------------------------------------------------------------------------

def _uint8_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), torch.randint(0, 151, (h, w), generator=g)


def test_eval_transforms_official_form():
    image, label = _uint8_image(60, 90)
    # Official call of the official eval (no TTA): a list holding one view; "slide" keeps the label's size.
    views, out_label = make_segmentation_eval_transforms(img_size=40, inference_mode="slide")(image, label)
    single, _ = make_single_view_eval_transforms(40, mean=OFFICIAL_MEAN, std=OFFICIAL_STD)(image, label)
    assert len(views) == 1 and views[0].shape == (3, 40, 60) and torch.equal(out_label, label)
    torch.testing.assert_close(views[0], single, **ATOL)
    # "whole" resizes the label too (nearest); a fixed (H, W) size resizes both exactly.
    views, out_label = make_segmentation_eval_transforms(img_size=30, inference_mode="whole")(image, label)
    assert views[0].shape == (3, 30, 45) and out_label.shape == (30, 45)
    assert set(out_label.unique().tolist()) <= set(label.unique().tolist())
    views, out_label = make_segmentation_eval_transforms(img_size=[32, 32])(image, label)
    assert views[0].shape == (3, 32, 32) and out_label.shape == (32, 32)
    # TTA: one view per ratio (the official size rule, from the original image), then their flips.
    ratios = [0.5, 0.9, 1.1]
    views, out_label = make_segmentation_eval_transforms(img_size=40, inference_mode="slide", use_tta=True,
                                                         tta_ratios=ratios)(image, label)
    assert [tuple(v.shape[-2:]) for v in views[:3]] == [tta_image_size(60, 90, 40, r) for r in ratios]
    assert all(torch.equal(views[3 + i], views[i].flip(-1)) for i in range(3)) and torch.equal(out_label, label)
    params = inspect.signature(make_segmentation_eval_transforms).parameters
    assert all(p.kind is p.KEYWORD_ONLY for p in params.values())


def test_train_transforms_official_form():
    image, label = _uint8_image(48, 64, seed=1)
    official_args = dict(img_size=32, random_img_size_ratio_range=[1.0, 1.0], crop_size=(24, 24), flip_prob=0.5,
                         reduce_zero_label=True, mean=OFFICIAL_MEAN, std=OFFICIAL_STD)
    torch.manual_seed(3)
    official = make_segmentation_train_transforms(**official_args)(image, label)
    torch.manual_seed(3)
    ours = make_segmentation_train_transforms(**official_args, cat_max_ratio=0.75, photometric=True)(image, label)
    torch.testing.assert_close(official[0], ours[0], **ATOL)
    assert torch.equal(official[1], ours[1])
    # reduce_zero_label: raw 0 -> 255, k -> k - 1 (so 150 never appears).
    assert 150 not in official[1].unique().tolist() and 255 in official[1].unique().tolist()
    assert set(official[1].unique().tolist()) <= set(reduce_zero_label(label).unique().tolist()) | {255}
    # Official defaults: no resize, no crop, no flip, photometric distortion on.
    defaults = make_segmentation_train_transforms()
    assert [type(t).__name__ for t in defaults.transforms] == ["ToFloat", "PhotoMetricDistortion", "Normalize"]
    assert defaults.transforms[1].hue == (-0.5, 0.5)


# -- hub ----------------------------------------------------------------------------------------------------------------

def test_m2f_hub_official_keywords(tmp_path, monkeypatch):
    kwargs = dict(pretrained=False, weights=SegmentorWeights.ADE20K, backbone_weights=Weights.LVD1689M,
                  check_hash=False, autocast_dtype=torch.float32)
    torch.manual_seed(0)
    official = dinov3_vit7b16_ms(**kwargs, hidden_dim=32, backbone_options=TINY_7B,
                                 m2f_options=TINY_HEAD["m2f_options"])
    torch.manual_seed(0)
    ours = dinov3_vit7b16_ms(pretrained=False, hidden_dim=32, backbone_options=TINY_7B, autocast_dtype=torch.float32,
                             m2f_options=TINY_HEAD["m2f_options"])
    x = torch.randn(1, 3, 64, 64)
    a, b = official.eval().predict(x, (64, 64)), ours.eval().predict(x, (64, 64))
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"], **ATOL)
    # The official `hash` keyword names another released head file.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(CheckpointError, match="dinov3_vit7b16_ade20k_m2f_head-0123abcd.pth"):
        dinov3_vit7b16_ms(hash="0123abcd", backbone_weights="/nonexistent.pth")


def test_patch14_names_load_the_patch16_models(caplog):
    repo = str(Path(__file__).resolve().parents[1])
    with caplog.at_level(logging.WARNING, logger="dinoseg"):
        model = torch.hub.load(repo, "dinov3_vitl14", source="local", trust_repo=True, pretrained=False, device="meta")
    assert model.patch_size == 16 and model.embed_dim == 1024
    assert [r.getMessage() for r in caplog.records] == [
        "dinov3_vitl14: DINOv3 ViTs have patch size 16, not 14; loading dinov3_vitl16"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinoseg"):
        segmentor = dinoseg.dinov3_vitl14_ade20k_linear(pretrained=False, device="meta")
    assert segmentor.segmentation_model[0].patch_size == 16 and len(caplog.records) == 1
    assert "dinov3_vitl16_ade20k_linear" in caplog.records[0].getMessage()
    for alias in ("dinov3_vits14", "dinov3_vitb14", "dinov3_vit7b14_ms", "dinov3_vith14plus_ade20k_linear"):
        assert callable(getattr(dinoseg, alias)) and alias in dinoseg.__all__
    assert inspect.signature(dinoseg.dinov3_vitl14) == inspect.signature(dinoseg.dinov3_vitl16)


# -- official module paths ----------------------------------------------------------------------------------------------

# Official module -> the public names it has that dinoseg provides there too.
OFFICIAL_PATHS = {
    "eval.segmentation.inference": ["make_inference", "slide_inference"],
    "eval.segmentation.eval": ["evaluate_segmentation_model", "RESULTS_FILENAME", "MAIN_METRICS"],
    "eval.segmentation.metrics": ["SEGMENTATION_METRICS", "calculate_segmentation_metrics", "preprocess_nonzero_labels",
                                  "calculate_intersect_and_union", "total_area_to_metrics"],
    "eval.segmentation.loss": ["MultiSegmentationLoss"],
    "eval.segmentation.schedulers": ["build_scheduler"],
    "eval.segmentation.transforms": ["make_segmentation_train_transforms", "make_segmentation_eval_transforms",
                                     "PhotoMetricDistortion", "ReduceZeroLabel"],
    "eval.segmentation.models": ["BackboneLayersSet", "FeatureDecoder", "build_segmentation_decoder"],
    "eval.segmentation.models.backbone.dinov3_adapter": ["DINOv3_Adapter"],
    "eval.segmentation.models.heads.linear_head": ["LinearHead"],
    "eval.segmentation.models.heads.mask2former_head": ["Mask2FormerHead"],
    "eval.segmentation.models.heads.pixel_decoder": ["MSDeformAttnPixelDecoder"],
    "eval.segmentation.models.heads.mask2former_transformer_decoder": ["MultiScaleMaskedTransformerDecoder"],
    "eval.segmentation.models.utils.ms_deform_attn": ["MSDeformAttn"],
    "eval.segmentation.models.utils.position_encoding": ["PositionEmbeddingSine"],
    "eval.utils": ["ModelWithIntermediateLayers"],
    "hub.backbones": ["Weights", "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vit7b16",
                      "dinov3_convnext_tiny"],
    "hub.segmentors": ["SegmentorWeights", "dinov3_vit7b16_ms"],
}


@pytest.mark.parametrize("path", sorted(OFFICIAL_PATHS))
def test_official_module_paths_import(path):
    module = importlib.import_module(f"dinoseg.{path}")
    for name in OFFICIAL_PATHS[path]:
        assert hasattr(module, name), f"dinoseg.{path}.{name}"
