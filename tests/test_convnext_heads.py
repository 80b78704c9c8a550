"""Heads on a ConvNeXt: the official linear head's outputs (predict, slide, flip), linear heads sized by the chosen
stages' widths (the official code crashes there), and Mask2Former on the stage pyramid (the official code cannot
build it)."""

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from dinoseg import AdapterOptions, BackboneLayersSet, ConvNeXt, Mask2FormerOptions, build_segmentation_decoder
from dinoseg.eval.segmentation.inference import make_inference, slide_inference, whole_image_size
from dinoseg.eval.segmentation.models.backbone.convnext_pyramid import ConvNeXtPyramid
from dinoseg.models.frozen import frozen_prefixes, head_state_dict, set_train_mode

from .test_convnext import CONVNEXT, official_convnext

LINEAR = "linear_last_on_convnext_a.pt"
TOL = dict(atol=1e-5, rtol=1e-5)
SMALL = dict(num_queries=8, nheads=2, dim_feedforward=64, enc_layers=1, dec_layers=2, pixel_decoder_nheads=2)
M2F_SMALL = dict(hidden_dim=32, m2f_options=Mask2FormerOptions(**SMALL))


def _entry():
    return json.loads((CONVNEXT / "index.json").read_text())[LINEAR]


def official_linear_segmentor():
    """The fixture's linear segmentor, loaded strictly from the official backbone and head weights."""
    entry = _entry()
    ref = torch.load(CONVNEXT / LINEAR, map_location="cpu", weights_only=True)
    backbone_sd = torch.load(CONVNEXT / entry["backbone"], map_location="cpu", weights_only=True)["state_dict"]
    segmentor = build_segmentation_decoder(
        official_convnext(), entry["backbone_out_layers"], "linear", num_classes=entry["num_classes"],
        dropout=entry["dropout"], use_batchnorm=entry["use_batchnorm"], use_cls_token=entry["use_cls_token"],
    )
    assert segmentor.segmentation_model[0].n == entry["backbone_out_indices"]
    assert segmentor.segmentation_model[1].in_channels == entry["head_in_channels"]
    state = {f"segmentation_model.0.feature_model.{k}": v for k, v in backbone_sd.items()}
    state.update(ref["head_state_dict"])
    assert set(head_state_dict(segmentor)) == set(ref["head_state_dict"])
    segmentor.load_state_dict(state, strict=True)
    return segmentor.eval(), ref


def _unequal(**kwargs):
    return ConvNeXt(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], **kwargs)


def test_linear_predict_matches_official():
    segmentor, ref = official_linear_segmentor()
    for x, expected in ((ref["x"], ref["predict_logits"]), (ref["x2"], ref["predict_logits_x2"])):
        torch.testing.assert_close(segmentor.predict(x, rescale_to=x.shape[-2:]), expected, **TOL)


def test_linear_slide_and_flip_match_official():
    segmentor, ref = official_linear_segmentor()
    crop, stride = _entry()["crop_size"], _entry()["stride"]
    x = ref["slide_x"]
    for crop_batch_size in (1, 4):
        logits = slide_inference(x, segmentor, crop_size=(crop, crop), stride=(stride, stride), crop_batch_size=crop_batch_size)
        torch.testing.assert_close(logits, ref["slide_logits"], **TOL)
    h, w = x.shape[-2:]
    probs = make_inference(x, segmentor, "slide", rescale_to=(2 * h, 2 * w), crop_size=crop, stride=stride,
                           apply_horizontal_flip=True, output_activation=partial(F.softmax, dim=1), crop_batch_size=3)
    torch.testing.assert_close(probs, ref["slide_flipped_softmax_2x"], **TOL)


@pytest.mark.parametrize("layers", [BackboneLayersSet.FOUR_LAST, BackboneLayersSet.FOUR_EVEN_INTERVALS])
def test_four_stage_linear_heads_take_the_stage_widths(layers):
    # The official code sizes this head 4 x 64 = 256 and fails: "running_mean should contain 160 elements not 256".
    segmentor = build_segmentation_decoder(official_convnext(), layers, "linear", num_classes=7).eval()
    head = segmentor.segmentation_model[1]
    assert segmentor.segmentation_model[0].n == [0, 1, 2, 3]
    assert head.in_channels == [16, 32, 48, 64] and head.channels == 160
    assert head.batchnorm_layer.num_features == 160 and head.conv.in_channels == 160
    x = torch.randn(1, 3, 90, 118)
    assert segmentor.predict(x, rescale_to=(90, 118)).shape == (1, 7, 90, 118)
    # The official head's computation: the four stage maps resized to the first one's grid and concatenated.
    maps = segmentor.segmentation_model[0](x)
    resized = [F.interpolate(m, size=maps[0].shape[-2:], mode="bilinear", align_corners=False) for m in maps]
    torch.testing.assert_close(head._features(maps), torch.cat(resized, dim=1))


def test_equal_widths_give_the_official_head():
    # Where the official code runs (equal stage widths), its head is [embed_dim] * 4: ours is the same.
    backbone = ConvNeXt(depths=[1, 1, 1, 1], dims=[16, 16, 16, 16])
    segmentor = build_segmentation_decoder(backbone, "FOUR_EVEN_INTERVALS", "linear", num_classes=3)
    assert segmentor.segmentation_model[1].in_channels == [backbone.embed_dim] * 4


def test_cls_token_linear_head_on_stages():
    segmentor = build_segmentation_decoder(_unequal(), "FOUR_LAST", "linear", num_classes=3, use_cls_token=True)
    assert segmentor.segmentation_model[1].channels == 2 * (8 + 16 + 24 + 32)
    assert segmentor.eval().predict(torch.randn(1, 3, 64, 64), rescale_to=(64, 64)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("size", [(64, 96), (90, 118)])
def test_m2f_pyramid_is_the_four_stages(size):
    backbone = _unequal().eval()
    pyramid = ConvNeXtPyramid(backbone)
    x = torch.randn(2, 3, *size)
    out = pyramid(x)
    assert list(out) == ["1", "2", "3", "4"]
    H, W = size
    padded = F.pad(x, (0, -W % 32, 0, -H % 32))
    with torch.no_grad():
        stages = backbone.get_intermediate_layers(padded, n=4, reshape=True, norm=True)
    for (key, level), stride, stage, width in zip(out.items(), (4, 8, 16, 32), stages, [8, 16, 24, 32]):
        # The adapter's sizes (ceil(side / stride)) and the stage's own width.
        assert level.shape == (2, width, -(-H // stride), -(-W // stride)), key
        torch.testing.assert_close(level, stage[..., : level.shape[-2], : level.shape[-1]])
    if size == (64, 96):  # no padding: exactly the backbone's stages, the last one normalised
        raw = backbone.get_intermediate_layers(x, n=4, reshape=True, norm=False)
        torch.testing.assert_close(out["1"], raw[0])
        expected = backbone.norm(raw[3].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(out["4"], expected)


def test_m2f_on_convnext_trains_the_head_only():
    segmentor = build_segmentation_decoder(_unequal(), "FOUR_EVEN_INTERVALS", "m2f", num_classes=5, **M2F_SMALL)
    side, head = segmentor.segmentation_model
    assert isinstance(side, ConvNeXtPyramid) and not list(side.parameters(recurse=False))
    # The pixel decoder's projections follow the per-level widths (levels 4, 3, 2 encoded; level 1 lateral).
    assert [conv[0].in_channels for conv in head.pixel_decoder.input_convs] == [32, 24, 16]
    assert head.pixel_decoder.lateral_convs[0].in_channels == 8
    assert frozen_prefixes(segmentor) == ["segmentation_model.0.backbone."]
    set_train_mode(segmentor)
    assert not side.backbone.training and head.training
    assert not any(p.requires_grad for p in side.backbone.parameters())
    out = segmentor(torch.randn(2, 3, 64, 64))
    assert out["pred_logits"].shape == (2, 8, 6) and out["pred_masks"].shape == (2, 8, 16, 16)
    (out["pred_logits"].sum() + out["pred_masks"].sum()).backward()
    assert all(p.grad is None for p in side.backbone.parameters())
    assert all(p.grad is not None for n, p in head.named_parameters() if "pixel_decoder.input_convs" in n)
    keys = head_state_dict(segmentor)
    assert keys and all(k.startswith("segmentation_model.1.") for k in keys)
    masks = segmentor.eval().predict(torch.randn(1, 3, 90, 118), rescale_to=(90, 118))["pred_masks"]
    assert masks.shape == (1, 8, 90, 118)


def test_linear_checkpoint_on_convnext_holds_the_head_only():
    segmentor = build_segmentation_decoder(_unequal(), "FOUR_LAST", "linear", num_classes=3)
    assert frozen_prefixes(segmentor) == ["segmentation_model.0.feature_model."]
    assert sorted(head_state_dict(segmentor)) == sorted(
        f"segmentation_model.1.{k}" for k in segmentor.segmentation_model[1].state_dict())


def test_m2f_on_convnext_errors():
    with pytest.raises(ValueError, match=r"reads its four stages \[0, 1, 2, 3\].*got \[3\]"):
        build_segmentation_decoder(_unequal(), "LAST", "m2f", num_classes=5, **M2F_SMALL)
    with pytest.raises(ValueError, match="without a pseudo patch_size"):
        build_segmentation_decoder(_unequal(patch_size=16), "FOUR_LAST", "m2f", num_classes=5, **M2F_SMALL)
    # The adapter section a config always carries, at its defaults, is accepted without a word.
    build_segmentation_decoder(_unequal(), "FOUR_LAST", "m2f", num_classes=5, hidden_dim=32,
                               m2f_options=Mask2FormerOptions(**SMALL, adapter=AdapterOptions(n_points=4, with_cp=True)))


def test_adapter_options_on_convnext_are_ignored_with_one_warning(caplog):
    """A config written for a ViT (demo_m2f.yaml sets adapter options) runs on a ConvNeXt: the adapter's shape options
    have nothing to shape there, and the warning names each one; the head is the one the defaults give."""
    import logging

    options = Mask2FormerOptions(**SMALL, adapter=AdapterOptions(n_points=8, deform_num_heads=4, with_cp=False))
    with caplog.at_level(logging.WARNING, logger="dinoseg"):
        torch.manual_seed(0)
        model = build_segmentation_decoder(_unequal(), "FOUR_LAST", "m2f", num_classes=5, hidden_dim=32,
                                           m2f_options=options)
        build_segmentation_decoder(_unequal(), "FOUR_LAST", "m2f", num_classes=5, hidden_dim=32, m2f_options=options)
    warned = [r.getMessage() for r in caplog.records if "ViT-Adapter options ignored" in r.getMessage()]
    assert warned == ["ViT-Adapter options ignored: a ConvNeXt feeds Mask2Former its own stages, without an adapter: "
                      "decoder_head.m2f.adapter.n_points=8, decoder_head.m2f.adapter.deform_num_heads=4, "
                      "decoder_head.m2f.adapter.with_cp=False"]  # once, however often the model is built
    torch.manual_seed(0)
    plain = build_segmentation_decoder(_unequal(), "FOUR_LAST", "m2f", num_classes=5, hidden_dim=32,
                                       m2f_options=Mask2FormerOptions(**SMALL))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_adapter_backbone_dtype_applies_to_a_convnext():
    """`adapter.backbone_dtype` is the backbone's autocast dtype, with or without an adapter."""
    options = Mask2FormerOptions(**SMALL, adapter=AdapterOptions(backbone_dtype="bfloat16"))
    model = build_segmentation_decoder(_unequal(), "FOUR_LAST", "m2f", num_classes=5, hidden_dim=32, m2f_options=options)
    pyramid = model.segmentation_model[0]
    assert pyramid.backbone_dtype == torch.bfloat16
    seen, run = [], pyramid.backbone.get_intermediate_layers

    def recording(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return run(*args, **kwargs)

    pyramid.backbone.get_intermediate_layers = recording
    pyramid(torch.zeros(1, 3, 64, 64))
    assert seen == [torch.bfloat16]


def test_whole_image_size_on_convnext():
    image = torch.zeros(1, 3, 70, 100)
    plain = build_segmentation_decoder(_unequal(), "LAST", "linear", num_classes=3)
    assert whole_image_size(image, plain) == (96, 128)  # the stride-32 grid
    pseudo = build_segmentation_decoder(_unequal(patch_size=16), "LAST", "linear", num_classes=3)
    assert whole_image_size(image, pseudo) == (80, 112)
    m2f = build_segmentation_decoder(_unequal(), "FOUR_LAST", "m2f", num_classes=3, **M2F_SMALL)
    assert whole_image_size(image, m2f) == (96, 128)
