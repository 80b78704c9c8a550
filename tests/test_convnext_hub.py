"""ConvNeXt hub entry points: exact parameter counts on the meta device, official file names, strict loading."""

import hashlib
import resource
import shutil
from pathlib import Path

import pytest
import torch

import dinoseg
from dinoseg.hub.backbones import dinov3_convnext_small, dinov3_convnext_tiny
from dinoseg.models.backbones import CONVNEXT_ARCHS, CheckpointError, Weights, make_backbone, official_weights_url

REPO = Path(__file__).resolve().parents[1]

# Exact counts (the final norm, stored twice in the checkpoints, counted once). Official model card: 27.8M, 49.5M,
# 87.6M, 196.2M. By the architecture: stem 4x4 conv + LayerNorm; per downsample a LayerNorm + 2x2 conv; per block
# a 7x7 depthwise conv (49C + C), a LayerNorm (2C), C->4C and 4C->C linears (8C^2 + 5C) and gamma (C), i.e.
# 8C^2 + 58C; the final LayerNorm. Tiny: 1,824,576 (stem, downsamples, final norm) + 25,995,552 (blocks).
PARAMS = {
    "dinov3_convnext_tiny": 27_820_128,
    "dinov3_convnext_small": 49_454_688,
    "dinov3_convnext_base": 87_566_464,
    "dinov3_convnext_large": 196_230_336,
}
HASHES = {"dinov3_convnext_tiny": "21b726bb", "dinov3_convnext_small": "296db49d",
          "dinov3_convnext_base": "801f2ba9", "dinov3_convnext_large": "61fa432d"}
SMALL = dict(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32])


def _by_formula(depths, dims, in_chans=3):
    n = in_chans * dims[0] * 16 + dims[0] + 2 * dims[0]  # stem conv + LayerNorm
    n += sum(2 * a + 4 * a * b + b for a, b in zip(dims, dims[1:]))  # LayerNorm + 2x2 conv
    n += sum(d * (8 * c * c + 58 * c) for d, c in zip(depths, dims))
    return n + 2 * dims[-1]


def _hub_load(name, **kwargs):
    return torch.hub.load(str(REPO), name, source="local", trust_repo=True, **kwargs)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_hub_architectures_on_meta_device(name):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = _hub_load(name, pretrained=False, device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert n == PARAMS[name] == _by_formula([len(stage) for stage in model.stages], model.embed_dims)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 100
    assert isinstance(model, dinoseg.ConvNeXt) and model.patch_size is None and model.n_blocks == 4
    assert model.stages[0][0].gamma is not None  # layer scale 1e-6
    assert name in dinoseg.__all__ and getattr(dinoseg, name) is getattr(dinoseg.hub, name)


def test_official_module_path():
    from dinoseg.models.convnext import ConvNeXt  # dinov3.models.convnext.ConvNeXt

    assert ConvNeXt is dinoseg.ConvNeXt and "ConvNeXt" in dinoseg.__all__


def test_official_file_names_and_urls():
    for name, tail in HASHES.items():
        size = name.split("_")[-1]
        assert official_weights_url(name, Weights.LVD1689M) == (
            f"https://dl.fbaipublicfiles.com/dinov3/dinov3_convnext_{size}/"
            f"dinov3_convnext_{size}_pretrain_lvd1689m-{tail}.pth"
        )
    assert set(CONVNEXT_ARCHS) == set(HASHES)


def test_official_weights_are_looked_up_in_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(CheckpointError, match="never downloads implicitly.*dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb"):
        dinov3_convnext_tiny()
    with pytest.raises(ValueError, match="no official SAT493M weights"):
        dinov3_convnext_tiny(weights=Weights.SAT493M)
    reference = make_backbone("dinov3_convnext_tiny", pretrained=False, **SMALL)
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth")
    loaded = dinov3_convnext_tiny(weights="LVD1689M", **SMALL)
    torch.testing.assert_close(loaded.norm.weight, reference.norm.weight)


def test_weights_are_assigned_strictly_and_round_trip(tmp_path):
    reference = make_backbone("dinov3_convnext_small", pretrained=False, **SMALL).eval()
    for p in reference.parameters():  # move every weight off its init value
        p.data.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "convnext.pth"
    torch.save(reference.state_dict(), path)
    loaded = _hub_load("dinov3_convnext_small", weights=str(path), **SMALL).eval()
    assert loaded.norm is loaded.norms[3] and loaded.norm.weight.device.type == "cpu"
    x = torch.randn(1, 3, 70, 100)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x))
    assert list(loaded.state_dict()) == list(reference.state_dict())
    # The full architecture does not fit this small checkpoint: a strict error naming the file and keys.
    with pytest.raises(CheckpointError, match=r"convnext.pth: does not fit ConvNeXt: .*missing keys: stages.0.1.gamma, "):
        dinov3_convnext_small(weights=str(path))


def test_hash_check(tmp_path):
    raw = tmp_path / "raw.pth"
    torch.save(make_backbone("dinov3_convnext_tiny", pretrained=False, **SMALL).state_dict(), raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    good = tmp_path / f"dinov3_convnext_tiny_pretrain_lvd1689m-{digest[:8]}.pth"
    shutil.copy(raw, good)
    dinov3_convnext_tiny(weights=str(good), check_hash=True, **SMALL)
    bad = tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-deadbeef.pth"
    shutil.copy(raw, bad)
    with pytest.raises(CheckpointError, match="does not match the hash deadbeef"):
        dinov3_convnext_tiny(weights=str(bad), check_hash=True, **SMALL)


def test_unknown_convnext_name():
    with pytest.raises(ValueError, match="unknown backbone 'dinov3_convnext_huge'; expected one of .*dinov3_convnext_tiny"):
        make_backbone("dinov3_convnext_huge")
