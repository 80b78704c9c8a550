import json

import pytest
import torch

from dinoseg import DinoVisionTransformer
from dinoseg.eval.utils import BackboneLayersSet, ModelWithIntermediateLayers, get_backbone_out_indices

from .conftest import FIXTURES, load_fixture

BACKBONES = ["backbone_vit_mlp.pt", "backbone_vit_swiglu_untied.pt"]
TOL = dict(atol=1e-5, rtol=1e-5)


def _official(name):
    kwargs = json.loads((FIXTURES / "index.json").read_text())[name]["official_kwargs"]
    ref = load_fixture(name)
    model = DinoVisionTransformer(**kwargs).eval()
    model.load_state_dict(ref["state_dict"], strict=True)
    return model, ref


@pytest.mark.parametrize("name", BACKBONES)
def test_forward_features_matches_official(name):
    model, ref = _official(name)
    with torch.no_grad():
        out = model.forward_features(ref["x"])
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(out[key], ref[key], **TOL)


@pytest.mark.parametrize("name", BACKBONES)
def test_intermediate_layers_match_official(name):
    model, ref = _official(name)
    with torch.no_grad():
        last4 = model.get_intermediate_layers(ref["x"], n=4, reshape=True, norm=True)
        first_last = model.get_intermediate_layers(
            ref["x"], n=[0, model.n_blocks - 1], norm=False, return_class_token=True, return_extra_tokens=True
        )
    assert len(last4) == 4
    for ours, theirs in zip(last4, ref["last4_reshaped_normed"]):
        torch.testing.assert_close(ours, theirs, **TOL)
    for ours, theirs in zip(first_last, ref["first_and_last_unnormed"]):
        assert len(ours) == 3
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, **TOL)


def test_buffers_are_loaded_not_recomputed():
    model, ref = _official("backbone_vit_mlp.pt")
    sd = dict(ref["state_dict"])
    sd["rope_embed.periods"] = sd["rope_embed.periods"] * 2
    sd["blocks.0.attn.qkv.bias_mask"] = torch.ones_like(sd["blocks.0.attn.qkv.bias_mask"])
    model.load_state_dict(sd, strict=True)
    torch.testing.assert_close(model.rope_embed.periods, sd["rope_embed.periods"])
    with torch.no_grad():
        out = model.forward_features(ref["x"])["x_norm_patchtokens"]
    assert not torch.allclose(out, ref["x_norm_patchtokens"], atol=1e-3)


def test_non_multiple_of_patch_size_is_an_error():
    model = DinoVisionTransformer(embed_dim=32, depth=1, num_heads=2, patch_size=16, pos_embed_rope_dtype="fp32")
    with pytest.raises(ValueError, match=r"50x64 is not a multiple of the patch size 16"):
        model.forward_features(torch.zeros(1, 3, 50, 64))


def test_rope_coordinate_augmentations_act_only_in_training():
    model = DinoVisionTransformer(
        embed_dim=32, depth=1, num_heads=2, pos_embed_rope_dtype="fp32",
        pos_embed_rope_shift_coords=0.5, pos_embed_rope_jitter_coords=1.5, pos_embed_rope_rescale_coords=2,
    )
    rope = model.rope_embed
    rope.eval()
    a, b = rope(H=3, W=4), rope(H=3, W=4)
    torch.testing.assert_close(a, b)
    rope.train()
    c = rope(H=3, W=4)
    assert not torch.allclose(a[0], c[0])


def test_rope_min_max_period_and_normalisation():
    from dinoseg.layers import RopePositionEmbedding

    rope = RopePositionEmbedding(64, num_heads=2, base=None, min_period=0.5, max_period=8.0)
    assert rope.periods[0].item() == pytest.approx(0.5) and rope.periods[-1].item() == pytest.approx(8.0)
    with pytest.raises(ValueError, match="either `base` or both"):
        RopePositionEmbedding(64, num_heads=2, base=100.0, min_period=0.5, max_period=8.0)
    for mode in ("min", "max", "separate"):
        sin, cos = RopePositionEmbedding(64, num_heads=2, normalize_coords=mode)(H=2, W=5)
        assert sin.shape == (10, 32)
    # "max" normalises both axes by the longer side: the short axis then covers only part of [-1, 1].
    r = RopePositionEmbedding(64, num_heads=2, normalize_coords="max")
    assert r._coords(2, 4)[:, 0].max() < r._coords(2, 4)[:, 1].max() == 0.75


def test_official_layer_index_rule():
    assert get_backbone_out_indices(12, BackboneLayersSet.LAST) == [11]
    assert get_backbone_out_indices(12, BackboneLayersSet.FOUR_LAST) == [8, 9, 10, 11]
    assert get_backbone_out_indices(12, BackboneLayersSet.FOUR_EVEN_INTERVALS) == [2, 5, 8, 11]
    assert get_backbone_out_indices(24, BackboneLayersSet.FOUR_EVEN_INTERVALS) == [4, 11, 17, 23]
    assert get_backbone_out_indices(40, "FOUR_EVEN_INTERVALS") == [9, 19, 29, 39]
    with pytest.raises(ValueError):
        get_backbone_out_indices(2, BackboneLayersSet.FOUR_LAST)


def test_model_with_intermediate_layers_is_frozen_and_graph_free():
    model, ref = _official("backbone_vit_mlp.pt")
    wrapper = ModelWithIntermediateLayers(model, n=[1, 3], reshape=True, return_class_token=True)
    wrapper.train()
    assert not model.training, "the backbone must stay in eval mode"
    assert all(not p.requires_grad for p in model.parameters())
    feats = wrapper(ref["x"])
    assert len(feats) == 2 and feats[0][0].shape == (2, 64, 4, 6) and feats[0][1].shape == (2, 64)
    assert feats[1][0].grad_fn is None and not feats[1][0].requires_grad
    # Outputs are ordinary tensors: a trainable head can build a graph on them.
    head = torch.nn.Conv2d(64, 3, 1)
    head(feats[1][0]).sum().backward()
    assert head.weight.grad is not None
    torch.testing.assert_close(feats[1][0], ref["last4_reshaped_normed"][3], atol=1e-5, rtol=1e-5)
