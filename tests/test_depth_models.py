"""Depthers: parity with the official reference outputs, official keys and call forms, and the fixed official bugs."""

import pytest
import torch
import torch.nn.functional as F

from dinoseg.eval.depth.models import (
    DecoderConfig,
    DPTHead,
    FeaturesToDepth,
    LinearHead,
    PatchSizeAdaptationStrategy,
    build_depther,
    make_depther_from_config,
    make_head,
)
from dinoseg.eval.depth.models.dpt_head import DPTHead as DPTHeadAtOfficialPath
from dinoseg.eval.depth.models.linear_head import LinearHead as LinearHeadAtOfficialPath
from dinoseg.eval.depth.transforms import LeftRightFlipAug
from dinoseg.eval.depth.utils import create_chmv2_mixlog_bins
from dinoseg.models.checkpoint import CheckpointError
from dinoseg.models.vision_transformer import DinoVisionTransformer

from ._depth_fixtures import DEPTHER_FIXTURES, TOL, depth_index, load_depth_fixture, official_depther


def _tiny_vit(depth=4, embed_dim=32):
    torch.manual_seed(0)
    vit = DinoVisionTransformer(patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=2, n_storage_tokens=4,
                                layerscale_init=1e-5, mask_k_bias=True, pos_embed_rope_dtype="fp32")
    vit.init_weights()
    return vit.eval()


def _flip_tta(depther, x):
    """What eval.py does with TTA: one forward on [x; hflip(x)], then the LeftRightFlipAug inverse."""
    return LeftRightFlipAug(flip=True).inverse(depther(torch.cat([x, torch.flip(x, dims=[-1])])))


# --- parity --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DEPTHER_FIXTURES)
def test_depther_matches_official_outputs(name):
    depther, data = official_depther(name)
    meta = depth_index()[name]
    assert depther.encoder.backbone_out_indices == meta["backbone_out_indices"]
    with torch.no_grad():
        for i, x in enumerate(data["x"]):
            depth = depther(x)
            assert list(depth.shape) == meta["output_shapes"][i]
            torch.testing.assert_close(depth, data["depth"][i], **TOL)
            torch.testing.assert_close(_flip_tta(depther, x), data["depth_tta"][i], **TOL)
            if "logits" in data:
                features = depther.encoder(x)
                torch.testing.assert_close(depther.decoder(features), data["logits"][i], **TOL)
                predicted = depther.decoder.predict(features, rescale_to=data["predict_size"][i])
                torch.testing.assert_close(predicted, data["decoder_predict"][i], **TOL)


def test_official_state_dict_keys_load_strictly():
    for name in DEPTHER_FIXTURES:
        depther, data = official_depther(name)
        assert set(depther.state_dict()) == set(data["state_dict"])
        assert all(k.startswith(("encoder.backbone.", "decoder.")) for k in depther.state_dict())


def test_features_to_depth_matches_official():
    data = load_depth_fixture("features_to_depth.pt")
    n_cases = 0
    for case in data["cases"]:
        if "chmv2_mixlog_bins" in case:
            bins = create_chmv2_mixlog_bins(case["min_depth"], case["max_depth"], case["n_bins"], None)
            torch.testing.assert_close(bins, case["chmv2_mixlog_bins"], **TOL)
            continue
        bins_strategy = "linear" if case["bins_strategy"] == "any" else case["bins_strategy"]
        norm_strategy = "linear" if case["norm_strategy"] == "any" else case["norm_strategy"]
        module = FeaturesToDepth(case["min_depth"], case["max_depth"], bins_strategy, norm_strategy)
        torch.testing.assert_close(module(data[case["input"]]), case["output"], **TOL)
        n_cases += 1
    assert n_cases == 26  # 2 ranges x (regression + 3 bins x 4 norms)


def test_official_module_paths_and_defaults():
    assert DPTHeadAtOfficialPath is DPTHead and LinearHeadAtOfficialPath is LinearHead
    config = DecoderConfig()
    assert (config.min_depth, config.max_depth, config.type, config.n_output_channels) == (0.001, 80, "linear", 256)
    assert config.adapt_to_patch_size is PatchSizeAdaptationStrategy.CENTER_PADDING
    assert (config.use_backbone_norm, config.use_batchnorm, config.use_cls_token) == (True, False, False)
    head = LinearHead([8], 4)  # official defaults: no batch norm, class token on
    assert head.use_cls_token and isinstance(head.batchnorm_layer, torch.nn.Identity) and head.channels == 16
    depther = build_depther(_tiny_vit(), "LAST", 8, head_type="linear")
    assert (depther.features_to_depth.min_depth, depther.features_to_depth.max_depth) == (0.001, 10.0)
    assert not depther.training


def test_patch_size_adaptation_accepts_names_and_values():
    for text, member in (("STRETCH", "STRETCH"), ("stretch", "STRETCH"), ("never", "NO_ADAPTATION"),
                         ("center_padding", "CENTER_PADDING")):
        assert PatchSizeAdaptationStrategy.parse(text) is PatchSizeAdaptationStrategy[member]
    with pytest.raises(ValueError, match="unknown adapt_to_patch_size 'crop'"):
        build_depther(_tiny_vit(), "LAST", 4, adapt_to_patch_size="crop")


def test_bad_layers_and_head_options_are_named():
    with pytest.raises(ValueError, match=r"backbone_out_layers \[1, 7\] must be block indices in \[0, 3\]"):
        build_depther(_tiny_vit(), [1, 7], 4)
    with pytest.raises(ValueError, match="unknown backbone_out_layers 'LAST_TWO'"):
        build_depther(_tiny_vit(), "LAST_TWO", 4)
    with pytest.raises(ValueError, match=r"invalid head_kwargs \['channels'\] for a 'linear' head"):
        build_depther(_tiny_vit(), "LAST", 4, head_type="linear", channels=16)
    with pytest.raises(ValueError, match="unknown head type 'mlp'"):
        make_head([32], 4, head_type="mlp")
    with pytest.raises(ValueError, match="unknown norm_strategy 'relu'"):
        FeaturesToDepth(norm_strategy="relu")


def test_frozen_backbone_stays_in_eval_mode_and_only_the_head_trains():
    depther = build_depther(_tiny_vit(), "LAST", 8, head_type="linear", use_batchnorm=True)
    depther.train()
    assert depther.decoder.training and not depther.encoder.backbone.training
    assert not any(p.requires_grad for p in depther.encoder.parameters())
    x = torch.randn(2, 3, 32, 48)
    depther(x).mean().backward()
    assert depther.decoder.conv_depth.weight.grad is not None


@pytest.mark.parametrize("kind", ["linear", "dpt"])
def test_checkpoint_path_loads_the_head_strictly_in_every_layout(tmp_path, kind):
    options = {"head_kwargs": {"channels": 16, "post_process_channels": [8, 8, 8, 8]}} if kind == "dpt" else {}
    config = DecoderConfig(type=kind, backbone_out_layers="FOUR_LAST", n_output_channels=4, **options)
    source = make_depther_from_config(_tiny_vit(), config)
    heads = source.decoder.state_dict()
    layouts = {
        "released.pth": heads,  # the released *_dpt_head-*.pth files: keys without prefix
        "trainer.pth": {"model": {f"module.{k}": v for k, v in heads.items()}},  # official trainer under DDP
        "decoder.pth": {f"decoder.{k}": v for k, v in heads.items()},
    }
    x = torch.randn(1, 3, 32, 32)
    for filename, content in layouts.items():
        torch.save(content, tmp_path / filename)
        loaded = make_depther_from_config(_tiny_vit(), config, checkpoint_path=str(tmp_path / filename))
        torch.testing.assert_close(loaded(x), source(x))
    broken = dict(heads)
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"broken.pth: does not fit .*1 unexpected keys: extra.weight"):
        make_depther_from_config(_tiny_vit(), config, checkpoint_path=str(tmp_path / "broken.pth"))


# --- official bugs, fixed ------------------------------------------------------------------------------------------
def test_float32_means_float32_on_cpu_and_bfloat16_is_opt_in():
    """The official Depther wraps CPU forwards in a bf16 autocast whatever autocast_dtype says."""
    depther, data = official_depther("depther_linear_nyu.pt")
    seen = []
    depther.decoder.register_forward_hook(lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), o.dtype)))
    x = data["x"][0]
    with torch.no_grad():
        torch.testing.assert_close(depther(x), data["depth"][0], **TOL)
        assert seen[-1] == (False, torch.float32)
        depther.autocast_dtype = torch.bfloat16
        low = depther(x)
    assert seen[-1] == (True, torch.bfloat16)
    assert low.dtype == torch.float32 and (low - data["depth"][0]).abs().max() > 1e-3


def test_depther_never_moves_itself_to_cuda(monkeypatch):
    """The official constructor calls .cuda() on the encoder and decoder whenever CUDA exists."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def refuse(*args, **kwargs):
        raise AssertionError("moved to CUDA")

    monkeypatch.setattr(torch.nn.Module, "cuda", refuse)
    monkeypatch.setattr(torch.Tensor, "cuda", refuse)
    depther = build_depther(_tiny_vit(), "LAST", 4, head_type="dpt", channels=16, post_process_channels=[8] * 4)
    assert all(p.device.type == "cpu" for p in depther.parameters())
    assert depther(torch.randn(1, 3, 32, 32)).device.type == "cpu"


def test_dpt_head_predict_resizes_the_logits():
    """Official DPTHead.predict raises AttributeError (it calls a missing UpConvHead.predict)."""
    depther, data = official_depther("depther_dpt_synthmix.pt")
    with torch.no_grad():
        features = depther.encoder(data["x"][0])
        logits = depther.decoder(features)
        predicted = depther.decoder.predict(features, rescale_to=(50, 70))
    assert predicted.shape == (2, 16, 50, 70)
    torch.testing.assert_close(predicted, F.interpolate(logits, size=(50, 70), mode="bilinear"))


def test_dpt_expand_channels_widens_the_deeper_levels():
    """Official expand_channels=True builds convs for expanded channels but feeds them unexpanded ones: crash."""
    head = DPTHead(in_channels=[32] * 4, channels=16, post_process_channels=[4, 4, 4, 4], expand_channels=True,
                   n_output_channels=3)
    assert head.post_process_channels == [4, 8, 16, 32]
    assert [p.conv.out_channels for p in head.reassemble_blocks.projects] == [4, 8, 16, 32]
    assert [c.conv.in_channels for c in head.convs] == [4, 8, 16, 32]
    features = [(torch.randn(2, 32, 3, 5), torch.randn(2, 32)) for _ in range(4)]
    assert head(features).shape == (2, 3, 48, 80)


def test_dpt_on_the_last_layer_only_feeds_it_to_every_level():
    """Official: a DPT head on one backbone layer raises IndexError."""
    depther = build_depther(_tiny_vit(), "LAST", 4, head_type="dpt", channels=16, post_process_channels=[8] * 4)
    assert depther.encoder.backbone_out_indices == [3]
    assert [p.conv.in_channels for p in depther.decoder.reassemble_blocks.projects] == [32] * 4
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        depth = depther(x)
        features = depther.encoder(x)
        four = depther.decoder(features * 4)
    assert depth.shape == (2, 1, 48, 64)
    torch.testing.assert_close(depther.features_to_depth(four), depth)


@pytest.mark.parametrize("name", ["depther_dpt_synthmix.pt", "depther_dpt_cls_log_sigmoid.pt", "depther_dpt_chmv2.pt"])
def test_dpt_odd_patch_grid_gives_16_pixels_per_patch(name):
    """Official: a 5 x 7 patch grid (70 x 100 padded to 80 x 112) gives a stretched 96 x 128 map, because each fusion
    block resizes the skip feature to the running one. Fixed: the running feature is resized to the skip feature;
    on even grids both rules agree with the official numbers."""
    fixed, data = official_depther(name, legacy_fusion_resize=False)
    with torch.no_grad():
        torch.testing.assert_close(fixed(data["x"][0]), data["depth"][0], **TOL)  # 4 x 6 grid
        odd = data["x"][1]
        assert fixed(odd).shape == (1, 1, 80, 112)
        levels = [t.shape[-2:] for t in fixed.decoder.reassemble_blocks(fixed.encoder(odd))]
    assert levels == [(20, 28), (10, 14), (5, 7), (3, 4)]
    legacy, _ = official_depther(name, legacy_fusion_resize=True)
    for model, sizes in ((fixed, [(5, 7), (10, 14), (20, 28), (40, 56)]), (legacy, [(6, 8), (12, 16), (24, 32), (48, 64)])):
        seen = []
        hooks = [b.register_forward_hook(lambda m, i, o, seen=seen: seen.append(tuple(o.shape[-2:])))
                 for b in model.decoder.fusion_blocks]
        with torch.no_grad():
            model(odd)
        for hook in hooks:
            hook.remove()
        assert seen == sizes  # fixed: each fusion output has the size of the next skip level (no stretching)
    with torch.no_grad():
        assert legacy(odd).shape == (1, 1, 96, 128)
