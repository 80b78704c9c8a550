import pytest
import torch

from dinoseg.models import CheckpointError, make_backbone
from dinoseg.models.backbones import load_hf_backbone

transformers = pytest.importorskip("transformers")


def _hf_model(gated: bool, tmp_path):
    config = transformers.DINOv3ViTConfig(
        hidden_size=64,
        intermediate_size=128 if gated else 256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_register_tokens=4,
        layerscale_value=0.5,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        patch_size=16,
        image_size=64,
    )
    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(config).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a wrong key mapping cannot hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("gated", [False, True])
def test_hf_checkpoint_reproduces_transformers(tmp_path, gated):
    hf = _hf_model(gated, tmp_path)
    ours = load_hf_backbone(tmp_path).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
        out = ours.forward_features(x)
    got = torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hf_checkpoint_through_a_hub_architecture(tmp_path):
    hf = _hf_model(False, tmp_path)
    # The hub function accepts the HF directory (or its safetensors file) like an official .pth.
    ours = make_backbone("dinov3_vits16", weights=str(tmp_path / "model.safetensors"), embed_dim=64, depth=2,
                         num_heads=4, layerscale_init=0.5).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.forward_features(x)["x_norm_patchtokens"], hf(pixel_values=x).last_hidden_state[:, 5:],
            atol=1e-5, rtol=1e-5,
        )


def test_hf_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_backbone(tmp_path)


def test_hf_config_with_foreign_activation(tmp_path):
    config = transformers.DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, use_gated_mlp=True, hidden_act="gelu")
    transformers.DINOv3ViTModel(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="hidden_act='gelu' with use_gated_mlp=True"):
        load_hf_backbone(tmp_path)
