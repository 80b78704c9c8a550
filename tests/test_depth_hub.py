"""Hub depthers: architectures on the meta device (official keys and parameter counts), local-only weights."""

import resource
from pathlib import Path

import pytest
import torch

from dinoseg.eval.depth.models import DecoderConfig
from dinoseg.hub import depthers as hub_depthers
from dinoseg.hub.depthers import dinov3_vit7b16_dd, dinov3_vitl16_chmv2
from dinoseg.models import CheckpointError, make_backbone

from ._depth_fixtures import load_depth_fixture

REPO = Path(__file__).resolve().parents[1]


def dpt_head_parameters(c_in, post, channels, readout, batchnorm, use_bias, projection, hidden, n_out):
    """Parameters of a DPT head, counted layer by layer from the architecture (not from the code under test)."""
    n = 4 * (2 * c_in * c_in + c_in) if readout else 0  # Linear(2C, C) class-token readouts
    n += 4 * 2 * c_in if batchnorm else 0  # BatchNorm weight + bias per layer
    n += sum(c_in * p + p for p in post)  # 1x1 projections
    n += post[0] * post[0] * 16 + post[0]  # ConvTranspose 4x4 stride 4
    n += post[1] * post[1] * 4 + post[1]  # ConvTranspose 2x2 stride 2
    n += post[3] * post[3] * 9 + post[3]  # Conv 3x3 stride 2 (level 2 is an identity)
    n += sum(p * channels * 9 for p in post)  # 3x3 convs to the fusion width, no bias
    unit = 2 * (channels * channels * 9 + (channels if use_bias else 0))  # residual conv unit: two 3x3 convs
    n += 4 * (channels * channels + channels) + 7 * unit  # 4 fusion blocks: 1x1 projection, 1 + 3 x 2 units
    n += channels * channels * 9 + channels if projection else 0  # 3x3 conv after fusion
    n += channels * (channels // 2) * 9 + channels // 2  # head: 3x3 conv to C / 2
    n += (channels // 2) * hidden * 9 + hidden + hidden * n_out + n_out  # 3x3 conv to hidden, 1x1 to the bins
    return n


VIT7B, VITL_SAT = 6_716_043_264, 303_154_176 + 2 * 1024  # backbones (test_hub.py); SAT ViT-L: + local class norm
DD_HEAD = dpt_head_parameters(4096, [2048] * 4, 512, readout=False, batchnorm=True, use_bias=False, projection=True,
                              hidden=32, n_out=256)
CHMV2_HEAD = dpt_head_parameters(1024, [128, 256, 512, 1024], 256, readout=True, batchnorm=False, use_bias=True,
                                 projection=False, hidden=128, n_out=256)


def _decoder_keys(fixture):
    return {k[len("decoder."):] for k in load_depth_fixture(fixture)["state_dict"] if k.startswith("decoder.")}


@pytest.mark.parametrize("name, backbone, head, layout", [
    ("dinov3_vit7b16_dd", VIT7B, DD_HEAD, "depther_dpt_synthmix.pt"),
    ("dinov3_vitl16_chmv2", VITL_SAT, CHMV2_HEAD, "depther_dpt_chmv2.pt"),
])
def test_hub_depthers_on_the_meta_device(name, backbone, head, layout):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    depther = torch.hub.load(str(REPO), name, source="local", trust_repo=True, pretrained=False, device="meta")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 300
    assert all(p.device.type == "meta" for p in depther.parameters())
    assert sum(p.numel() for p in depther.encoder.parameters()) == backbone
    assert sum(p.numel() for p in depther.decoder.parameters()) == head
    assert set(depther.state_dict()) == {f"encoder.backbone.{k}" for k in depther.encoder.backbone.state_dict()} | {
        f"decoder.{k}" for k in depther.decoder.state_dict()}
    # The released head files hold exactly the decoder keys of the official layout (fixtures of the same layout).
    assert set(depther.decoder.state_dict()) == _decoder_keys(layout)


def test_hub_depther_settings():
    assert DD_HEAD == 230_687_776 and CHMV2_HEAD == 33_747_200
    dd = dinov3_vit7b16_dd(pretrained=False, device="meta")
    assert dd.encoder.backbone_out_indices == [9, 19, 29, 39] and dd.decoder.channels == 512
    f = dd.features_to_depth
    assert (f.min_depth, f.max_depth, f.bins_strategy, f.norm_strategy) == (0.001, 100.0, "linear", "linear")
    assert dinov3_vit7b16_dd(pretrained=False, device="meta", depth_range=(0.1, 20.0)).features_to_depth.max_depth == 20.0
    chm = dinov3_vitl16_chmv2(pretrained=False, device="meta")
    assert chm.encoder.backbone_out_indices == [5, 11, 17, 23] and chm.encoder.backbone.local_cls_norm is not None
    f = chm.features_to_depth
    assert (f.min_depth, f.max_depth, f.bins_strategy, f.norm_strategy) == (0.001, 96.0, "chmv2_mixlog", "chmv2_mixlog")
    assert dd.autocast_dtype == chm.autocast_dtype == torch.float32


@pytest.mark.parametrize("fn, filename", [
    (dinov3_vit7b16_dd, "dinov3_vit7b16_synthmix_dpt_head-02040be1.pth"),
    (dinov3_vitl16_chmv2, "dinov3_vitl16_chmv2_dpt_head-3703d643.pth"),
])
def test_released_heads_are_never_downloaded_implicitly(tmp_path, monkeypatch, fn, filename):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(CheckpointError, match=f"{filename}: the official .* never downloads implicitly"):
        fn()
    with pytest.raises(ValueError, match="there is no released"):
        fn(weights="CHMV2" if fn is dinov3_vit7b16_dd else "SYNTHMIX")


SMALL_CHMV2 = DecoderConfig(min_depth=0.001, max_depth=96.0, backbone_out_layers=[5, 11, 17, 23], n_output_channels=8,
                            use_backbone_norm=True, use_cls_token=True, type="dpt", bins_strategy="chmv2_mixlog",
                            norm_strategy="chmv2_mixlog",
                            head_kwargs=dict(channels=16, post_process_channels=[8, 8, 8, 8], n_hidden_channels=8,
                                             use_bias=True, projection_after_fusion=False))


def test_pretrained_depther_loads_local_files_strictly(tmp_path, monkeypatch):
    """The loading path of the released files, on a small backbone and head of the same layout."""
    monkeypatch.setattr(hub_depthers, "chmv2_depther_config", lambda: SMALL_CHMV2)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    arch = dict(embed_dim=32, depth=24, num_heads=2)
    reference = dinov3_vitl16_chmv2(pretrained=False, backbone_options=arch)
    backbone_file = tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    torch.save(reference.encoder.backbone.state_dict(), backbone_file)
    (tmp_path / "checkpoints").mkdir()
    head_file = tmp_path / "checkpoints" / "dinov3_vitl16_chmv2_dpt_head-3703d643.pth"
    torch.save(reference.decoder.state_dict(), head_file)  # the released layout: decoder keys, no prefix
    x = torch.randn(1, 3, 48, 64)
    for weights in ("CHMV2", str(head_file)):
        loaded = dinov3_vitl16_chmv2(weights=weights, backbone_weights=str(backbone_file), backbone_options=arch)
        assert not any(t.is_meta for t in loaded.state_dict().values())
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), reference(x))
    wrong = reference.decoder.state_dict()
    wrong.pop("conv_depth.head.4.bias")
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"wrong.pth: does not fit DPTHead: 1 missing keys: conv_depth.head.4.bias"):
        dinov3_vitl16_chmv2(weights=str(tmp_path / "wrong.pth"), backbone_weights=str(backbone_file), backbone_options=arch)


def test_pretrained_depther_in_half_precision(tmp_path, monkeypatch):
    """`dtype=` stores backbone and head in half precision (norms float32) and stays close to float32 weights."""
    monkeypatch.setattr(hub_depthers, "chmv2_depther_config", lambda: SMALL_CHMV2)
    arch = dict(embed_dim=32, depth=24, num_heads=2)
    torch.manual_seed(0)
    reference = dinov3_vitl16_chmv2(pretrained=False, backbone_options=arch)
    torch.save(reference.encoder.backbone.state_dict(), tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")
    torch.save(reference.decoder.state_dict(), tmp_path / "head.pth")
    half = dinov3_vitl16_chmv2(weights=str(tmp_path / "head.pth"),
                               backbone_weights=str(tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"),
                               backbone_options=arch, dtype=torch.bfloat16)
    dtypes = {n: t.dtype for n, t in half.named_parameters()}
    assert dtypes["encoder.backbone.blocks.0.attn.qkv.weight"] == torch.bfloat16
    assert dtypes["encoder.backbone.norm.weight"] == torch.float32
    assert {d for n, d in dtypes.items() if n.startswith("decoder.") and n.endswith("conv.weight")} == {torch.bfloat16}
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        expected, got = reference(x), half(x)  # float32 input, no autocast asked: the half weights imply it
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    random = dinov3_vitl16_chmv2(pretrained=False, backbone_options=arch, dtype=torch.float16)
    assert random.encoder.backbone.blocks[0].mlp.fc1.weight.dtype == torch.float16


def test_sat_backbone_layout_follows_the_backbone_weights():
    plain = dinov3_vitl16_chmv2(pretrained=False, device="meta", backbone_weights="LVD1689M")
    assert plain.encoder.backbone.local_cls_norm is None
    assert make_backbone("dinov3_vitl16", pretrained=False, device="meta").local_cls_norm is None
