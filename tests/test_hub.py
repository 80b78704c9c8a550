import hashlib
import resource
import shutil
from pathlib import Path

import pytest
import torch

from dinoseg.hub.backbones import dinov3_vits16
from dinoseg.models import ARCHS, CheckpointError, make_backbone

REPO = Path(__file__).resolve().parents[1]

# Parameter counts of the official architectures (the official README rounds them to 21M, 29M, 86M, 300M,
# 840M and 6,716M).
PARAMS = {
    "dinov3_vits16": 21_601_152,
    "dinov3_vits16plus": 28_697_472,
    "dinov3_vitb16": 85_669_632,
    "dinov3_vitl16": 303_154_176,
    "dinov3_vitl16plus": 403_915_776,
    "dinov3_vith16plus": 840_633_600,
    "dinov3_vit7b16": 6_716_043_264,
}


def _hub_load(name, **kwargs):
    return torch.hub.load(str(REPO), name, source="local", trust_repo=True, **kwargs)


def _tiny(**kw):
    # A hub architecture made small through the official keyword overrides: fast checkpoints for error tests.
    return make_backbone("dinov3_vits16", pretrained=False, embed_dim=32, depth=2, num_heads=2, **kw)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_hub_architectures_on_meta_device(name):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = _hub_load(name, pretrained=False, device="meta")
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert all(p.device.type == "meta" for p in model.parameters())
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"meta construction of {name} allocated {grown_mib:.0f} MiB"
    assert model.n_blocks == ARCHS[name][1]["depth"]


def test_checkpoint_round_trips_through_torch_hub_load(tmp_path):
    model = _hub_load("dinov3_vits16", pretrained=False).eval()
    path = tmp_path / "dinov3_vits16_pretrain_mine.pth"
    torch.save(model.state_dict(), path)
    loaded = _hub_load("dinov3_vits16", weights=str(path)).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x)["x_prenorm"], model.forward_features(x)["x_prenorm"])
    assert loaded.cls_token.device.type == "cpu"
    # A file:// URL is the same file.
    again = _hub_load("dinov3_vits16", weights=path.as_uri())
    torch.testing.assert_close(again.cls_token, model.cls_token)


def _save(tmp_path, sd, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_wrong_keys_are_listed(tmp_path):
    sd = _tiny().state_dict()
    sd["blocks.0.attn.qkv.weight_renamed"] = sd.pop("blocks.0.attn.qkv.weight")
    path = _save(tmp_path, sd)
    with pytest.raises(CheckpointError) as err:
        make_backbone("dinov3_vits16", weights=str(path), embed_dim=32, depth=2, num_heads=2)
    msg = str(err.value)
    assert str(path) in msg and "1 missing keys: blocks.0.attn.qkv.weight" in msg
    assert "1 unexpected keys: blocks.0.attn.qkv.weight_renamed" in msg


def test_wrong_shapes_are_listed(tmp_path):
    sd = _tiny().state_dict()
    path = _save(tmp_path, sd)
    with pytest.raises(CheckpointError, match=r"shape mismatches: cls_token \(1, 1, 32\) vs \(1, 1, 64\)"):
        make_backbone("dinov3_vits16", weights=str(path), embed_dim=64, depth=2, num_heads=2)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth: checkpoint file not found"):
        dinov3_vits16(weights=str(tmp_path / "nope.pth"))


def test_official_weights_are_never_downloaded_implicitly(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(CheckpointError, match="never downloads implicitly.*dinov3_vits16_pretrain_lvd1689m-08c60483"):
        dinov3_vits16()  # default: the LVD1689M weight set


def test_official_weights_found_in_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = _hub_load("dinov3_vits16", pretrained=False)
    (tmp_path / "checkpoints").mkdir()
    torch.save(model.state_dict(), tmp_path / "checkpoints" / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    loaded = dinov3_vits16(weights="LVD1689M")
    torch.testing.assert_close(loaded.cls_token, model.cls_token)


def test_hash_check(tmp_path):
    sd = _tiny().state_dict()
    raw = _save(tmp_path, sd, "raw.pth")
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    good = tmp_path / f"tiny-{digest[:8]}.pth"
    shutil.copy(raw, good)
    kw = dict(embed_dim=32, depth=2, num_heads=2)
    make_backbone("dinov3_vits16", weights=str(good), check_hash=True, **kw)
    bad = tmp_path / "tiny-deadbeef.pth"
    shutil.copy(raw, bad)
    with pytest.raises(CheckpointError, match="tiny-deadbeef.pth: sha256 .* does not match the hash deadbeef"):
        make_backbone("dinov3_vits16", weights=str(bad), check_hash=True, **kw)
    with pytest.raises(CheckpointError, match="carries no"):
        make_backbone("dinov3_vits16", weights=str(raw), check_hash=True, **kw)


class _NotATensor:
    pass


def test_pickle_refused_by_weights_only(tmp_path):
    path = _save(tmp_path, {"cls_token": _NotATensor()})
    with pytest.raises(CheckpointError, match=r"ckpt.pth: holds Python objects beyond tensors \(.*_NotATensor\); refused$") as e:
        make_backbone("dinov3_vits16", weights=str(path), embed_dim=32, depth=2, num_heads=2)
    assert "weights_only" not in str(e.value)  # never a hint to load it unsafely


def test_garbage_file(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth: not a readable PyTorch checkpoint"):
        make_backbone("dinov3_vits16", weights=str(path), embed_dim=32, depth=2, num_heads=2)


def test_vit7b_loads_by_assignment_without_a_second_copy(tmp_path):
    # Small stand-in for 7B's layout (SwiGLU64, no qkv bias, untied local class norm).
    kw = dict(embed_dim=64, depth=2, num_heads=2)
    ref = make_backbone("dinov3_vit7b16", pretrained=False, **kw)
    assert ref.local_cls_norm is not None and ref.blocks[0].mlp.w1.out_features == 128
    path = _save(tmp_path, ref.state_dict())
    loaded = make_backbone("dinov3_vit7b16", weights=str(path), **kw)
    assert loaded.cls_token.data_ptr() != 0 and loaded.cls_token.device.type == "cpu"
    torch.testing.assert_close(loaded.blocks[1].mlp.w3.weight, ref.blocks[1].mlp.w3.weight)


def test_vitl_sat_weights_get_the_untied_norm(tmp_path):
    kw = dict(embed_dim=32, depth=2, num_heads=2)
    ref = make_backbone("dinov3_vitl16", pretrained=False, untie_global_and_local_cls_norm=True, **kw)
    path = _save(tmp_path, ref.state_dict(), "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")
    loaded = make_backbone("dinov3_vitl16", weights=str(path), **kw)
    assert loaded.local_cls_norm is not None


def test_hub_segmentor_entry_points_on_meta_device():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seg = _hub_load("dinov3_vit7b16_ms", pretrained=False, device="meta")
    n = sum(p.numel() for p in seg.parameters())
    assert n == 7_643_463_639  # 6,716,043,264 backbone + 927,420,375 adapter and Mask2Former head (hidden 2048)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 300
    linear = _hub_load("dinov3_vitl16_ade20k_linear", pretrained=False, device="meta")
    assert linear.segmentation_model[1].conv.out_channels == 150
