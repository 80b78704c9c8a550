"""ConvNeXt backbone: official parity (both inputs, every output), the final norm stored twice, and the
documented semantics the reference does not pin (pseudo patch size, stage order, errors)."""

import json

import pytest
import torch
import torch.nn.functional as F

from dinoseg import ConvNeXt
from dinoseg.models.checkpoint import CheckpointError, load_state_dict_strict

from .conftest import FIXTURES

CONVNEXT = FIXTURES / "convnext"
NAME = "backbone_convnext_a.pt"
TOL = dict(atol=1e-5, rtol=1e-5)


def _index():
    return json.loads((CONVNEXT / "index.json").read_text())


def _reference():
    return torch.load(CONVNEXT / NAME, map_location="cpu", weights_only=True)


def official_convnext(**overrides):
    """The fixture's ConvNeXt, built from the official keywords and loaded strictly."""
    model = ConvNeXt(**{**_index()[NAME]["official_kwargs"], **overrides}).eval()
    model.load_state_dict(_reference()["state_dict"], strict=True)
    return model


def _assert_same(ours, theirs, where):
    """Nested tuples/lists of tensors (tuples of the official code were saved as lists)."""
    if isinstance(theirs, (list, tuple)):
        assert isinstance(ours, tuple) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert ours.shape == theirs.shape, where
        torch.testing.assert_close(ours, theirs, **TOL, msg=where)


@pytest.mark.parametrize("input_index", [0, 1], ids=["64x96", "90x118"])
def test_outputs_match_official(input_index):
    model, ref, index = official_convnext(), _reference(), _index()[NAME]
    x = ref["x"][input_index]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref["forward"][input_index], **TOL)
        features = model.forward_features(x)
        assert list(features) == index["forward_features_keys"]
        for key in index["forward_features_keys"]:
            expected = ref["forward_features"][input_index][key]
            if expected is None:
                assert features[key] is None, key
            else:
                assert features[key].shape == expected.shape, key
                torch.testing.assert_close(features[key], expected, **TOL)
        assert set(index["gil_variants"]) == set(ref["get_intermediate_layers"])
        for variant, kwargs in index["gil_variants"].items():
            out = model.get_intermediate_layers(x, **kwargs)
            _assert_same(out, ref["get_intermediate_layers"][variant][input_index], variant)


def test_positional_call_forms_of_the_official_code():
    model, ref = official_convnext(), _reference()
    x = ref["x"][0]
    with torch.no_grad():
        # get_intermediate_layers(x, n, reshape, return_class_token, norm), all positional as the official code allows
        out = model.get_intermediate_layers(x, 4, True, True, False)
    _assert_same(out, ref["get_intermediate_layers"]["n4_reshape_unnormed_cls"][0], "positional")


def test_state_dict_round_trips_the_official_layout():
    model, ref = official_convnext(), _reference()
    assert list(model.state_dict()) == list(ref["state_dict"])  # same keys, same order
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref["state_dict"][key]), key
    # One module, counted once as parameters.
    assert model.norms[3] is model.norm
    names = [n for n, _ in model.named_parameters()]
    assert "norm.weight" in names and not any(n.startswith("norms.") for n in names)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(v.numel() for v in ref["state_dict"].values()) - 2 * 64


def test_differing_copies_of_the_final_norm_are_refused():
    sd = dict(_reference()["state_dict"])
    sd["norms.3.bias"] = sd["norms.3.bias"] + 1
    model = ConvNeXt(**_index()[NAME]["official_kwargs"])
    with pytest.raises(ValueError, match="norm.bias and norms.3.bias differ"):
        model.load_state_dict(sd, strict=True)
    with pytest.raises(CheckpointError, match=r"^mine.pth: norm.bias and norms.3.bias differ"):
        load_state_dict_strict(model, sd, source="mine.pth")
    # Strict: a checkpoint holding only one of the two copies does not fit.
    del sd["norms.3.bias"]
    with pytest.raises(CheckpointError, match="1 missing keys: norms.3.bias"):
        load_state_dict_strict(model, sd, source="mine.pth")


def test_list_input_gives_one_dict_per_image():
    model, ref = official_convnext(), _reference()
    with torch.no_grad():
        outs = model.forward_features(ref["x"])  # masks=None works for lists too (the official code needs a list)
        masked = model.forward_features(ref["x"], masks=["m0", "m1"])
    assert len(outs) == 2
    for out, expected in zip(outs, ref["forward_features"]):
        torch.testing.assert_close(out["x_norm_patchtokens"], expected["x_norm_patchtokens"], **TOL)
    assert [m["masks"] for m in masked] == ["m0", "m1"]
    with pytest.raises(ValueError, match="2 images but 1 masks"):
        model.forward_features(ref["x"], masks=[None])


def test_is_training_returns_the_dict():
    model, ref = official_convnext(), _reference()
    with torch.no_grad():
        out = model(ref["x"][0], is_training=True)
    torch.testing.assert_close(out["x_norm_clstoken"], ref["forward"][0], **TOL)


def test_pseudo_patch_size_resizes_intermediate_maps_only():
    model, plain, ref = official_convnext(patch_size=8), official_convnext(), _reference()
    x = ref["x"][1]  # 90x118 -> a 11x14 grid with patch size 8
    with torch.no_grad():
        resized = model.get_intermediate_layers(x, n=4, reshape=True, norm=False, return_class_token=True)
        raw = plain.get_intermediate_layers(x, n=4, reshape=True, norm=False, return_class_token=True)
        normed = model.get_intermediate_layers(x, n=1, reshape=True, norm=True, return_class_token=True)
        features = model.forward_features(x)
    for (fmap, cls), (raw_map, raw_cls) in zip(resized, raw):
        expected = F.interpolate(raw_map, size=(11, 14), mode="bilinear", antialias=True)
        torch.testing.assert_close(fmap, expected)
        torch.testing.assert_close(cls, raw_cls)  # pooled before the resize
    # The norm applies after the resize, over channels; the class token is the normalised pool.
    fmap, cls = normed[0]
    expected = model.norm(F.interpolate(raw[3][0], size=(11, 14), mode="bilinear", antialias=True).permute(0, 2, 3, 1))
    torch.testing.assert_close(fmap, expected.permute(0, 3, 1, 2))
    torch.testing.assert_close(cls, model.norm(raw[3][1]))
    # forward_features keeps the stage grid (2x3 at stride 32).
    torch.testing.assert_close(features["x_norm_patchtokens"], ref["forward_features"][1]["x_norm_patchtokens"], **TOL)


def test_stage_lists_keep_their_order():
    model, ref = official_convnext(), _reference()
    x = ref["x"][0]
    with torch.no_grad():
        forward = model.get_intermediate_layers(x, n=[1, 3], return_class_token=True)
        backward = model.get_intermediate_layers(x, n=[3, 1], return_class_token=True)
        twice = model.get_intermediate_layers(x, n=[2, 2])
    _assert_same(backward, tuple(reversed(forward)), "reversed")  # the official code mismatches the norms here
    assert len(twice) == 2 and torch.equal(twice[0], twice[1])


@pytest.mark.parametrize("n", [0, 5, [4], [-1], []])
def test_bad_stage_selection_is_an_error(n):
    model = ConvNeXt(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8])
    with pytest.raises(ValueError, match="out of range for 4 stages"):
        model.get_intermediate_layers(torch.zeros(1, 3, 32, 32), n=n)


def test_layer_scale_is_optional():
    with_scale = ConvNeXt(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8], layer_scale_init_value=0.5)
    assert torch.equal(with_scale.stages[0][0].gamma, torch.full((8,), 0.5))
    without = ConvNeXt(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8], layer_scale_init_value=0)
    assert without.stages[0][0].gamma is None
    assert not any(k.endswith("gamma") for k in without.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert without(x).shape == (1, 8)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.0"):
        ConvNeXt(drop_path_rate=1.0)
    with pytest.raises(ValueError, match="4 stages each"):
        ConvNeXt(depths=[1, 1, 1], dims=[8, 8, 8])
    with pytest.raises(ValueError, match="patch_size must be a positive int or None, got 0"):
        ConvNeXt(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8], patch_size=0)
    with pytest.raises(TypeError):  # the official code logs and ignores unknown keywords; a typo is an error here
        ConvNeXt(depth=[1, 1, 1, 1])


def test_meta_device_allocates_nothing_and_init_weights_is_official():
    meta = ConvNeXt(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32], device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    model = ConvNeXt(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32])
    block = model.stages[2][1]
    assert torch.equal(block.gamma, torch.full((24,), 1e-6))
    assert torch.equal(model.downsample_layers[1][0].weight, torch.ones(8))
    assert torch.equal(block.pwconv1.bias, torch.zeros(96))
    assert 0.015 < block.pwconv1.weight.std() < 0.025  # trunc_normal_(std=0.02), cut at +-2 as in the official code
    assert model.n_blocks == 4 and model.embed_dim == 32 and model.embed_dims == [8, 16, 24, 32]
