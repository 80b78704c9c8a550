"""Half-precision weights: what is stored in bfloat16 / float16, how close the outputs stay to float32 weights,
whole-model `.to(half)`, hub and config options, and streamed loading that never holds a float32 copy."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from dinoseg import AdapterOptions, DinoVisionTransformer, Mask2FormerOptions, build_segmentation_decoder
from dinoseg.cli import main
from dinoseg.engine.checkpoint import LAST
from dinoseg.eval.segmentation.inference import slide_inference
from dinoseg.hub import dinov3_vit7b16_ms, dinov3_vits16
from dinoseg.models.precision import cast_weights, float32_names, half_weights_dtype

from .engine_utils import REPO, cli_env, tiny

VIT = dict(embed_dim=64, depth=4, num_heads=4, n_storage_tokens=4, layerscale_init=1e-5, pos_embed_rope_dtype="fp32",
           mask_k_bias=True)
M2F = dict(hidden_dim=32, m2f_options=Mask2FormerOptions(num_queries=8, nheads=4, dim_feedforward=64, enc_layers=1,
                                                         dec_layers=2, pixel_decoder_nheads=4,
                                                         adapter=AdapterOptions(deform_num_heads=4, with_cp=False)))
# Stated tolerance of half-precision weights against float32 weights: softmax probabilities after the sliding
# window differ by less than this, so every pixel whose float32 decision margin (top-1 minus top-2 probability)
# is larger than twice that keeps its class.
TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.01}


def segmentor(kind: str):
    torch.manual_seed(0)
    model = build_segmentation_decoder(DinoVisionTransformer(**VIT), "FOUR_EVEN_INTERVALS", kind, num_classes=5,
                                       **(M2F if kind == "m2f" else {})).eval()
    for m in model.modules():  # batch norm statistics away from their init values
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_()
    if kind == "linear":  # class scores of a trained head's size, not the near-ties of its 0.01-std init
        torch.nn.init.normal_(model.segmentation_model[1].conv.weight, std=0.3)
    return model


def probabilities(model, x):
    return slide_inference(x, model, crop_size=64, stride=48).softmax(1)


@pytest.mark.parametrize("kind", ["linear", "m2f"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_stay_close_to_float32(kind, dtype):
    model = segmentor(kind)
    x = torch.randn(2, 3, 64, 96)
    reference = probabilities(model, x)
    atol = TOLERANCE[dtype]
    top2 = reference.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * atol
    for half in (cast_weights(copy.deepcopy(model), dtype), copy.deepcopy(model).to(dtype)):  # both ways work
        assert half_weights_dtype(half) == dtype
        got = probabilities(half, x)
        assert got.dtype == torch.float32  # scores and the accumulator stay float32
        assert (got - reference).abs().max() < atol
        assert torch.equal(got.argmax(1)[decided], reference.argmax(1)[decided])
        if kind == "linear":  # scores of a trained head's size: nearly every pixel is decided
            assert (got.argmax(1) == reference.argmax(1)).float().mean() > 0.99


def test_what_stays_float32():
    model = cast_weights(segmentor("m2f"), torch.bfloat16)
    dtypes = {name: t.dtype for name, t in model.state_dict().items() if t.is_floating_point()}
    keep = float32_names(model) & set(dtypes)  # (integer buffers such as num_batches_tracked are never cast)
    assert {n for n, d in dtypes.items() if d == torch.float32} == keep
    assert any(".rope_embed.periods" in n for n in keep)  # RoPE periods
    assert any(n.endswith("norm1.weight") for n in keep)  # normalisations
    assert any(".pixel_decoder." in n and ".norm" in n for n in keep)  # its GroupNorms
    # Matrix products are half (they run so under the official autocast); the sampling itself computes in float32.
    assert dtypes["segmentation_model.1.pixel_decoder.mask_feature.weight"] == torch.bfloat16
    assert dtypes["segmentation_model.0.interactions.0.extractor.attn.sampling_offsets.weight"] == torch.bfloat16
    assert dtypes["segmentation_model.0.backbone.blocks.0.attn.qkv.weight"] == torch.bfloat16
    assert dtypes["segmentation_model.1.predictor.class_embed.weight"] == torch.bfloat16
    full = sum(t.numel() * 4 for t in segmentor("m2f").state_dict().values() if t.is_floating_point())
    half = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n in dtypes)
    assert half < 0.6 * full
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        cast_weights(model, torch.float64)


def test_a_half_backbone_takes_float32_input_without_autocast():
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(**VIT).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = backbone.get_intermediate_layers(x, n=1)[0]
        half = cast_weights(copy.deepcopy(backbone), torch.bfloat16)
        out = half.get_intermediate_layers(x, n=1)[0]
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_hub_dtype_keyword_builds_the_7b_segmentor_in_half_precision():
    model = dinov3_vit7b16_ms(pretrained=False, device="meta", dtype=torch.bfloat16)
    sizes = {}
    for t in model.state_dict().values():
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel() * t.element_size()
    backbone = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if ".backbone." in n)
    assert 13.3e9 < backbone < 13.6e9  # 6.7B parameters at 2 bytes (+ float32 norms)
    assert sizes[torch.bfloat16] > 5 * sizes[torch.float32]


def test_hub_backbone_loads_a_float32_file_into_half_precision(tmp_path):
    kw = dict(embed_dim=64, depth=2, num_heads=4)
    reference = dinov3_vits16(pretrained=False, **kw).eval()
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    half = dinov3_vits16(weights=str(path), dtype=torch.float16, **kw).eval()
    assert half.blocks[0].mlp.fc1.weight.dtype == torch.float16 and half.norm.weight.dtype == torch.float32
    assert half.rope_embed.periods.dtype == torch.float32
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        a, b = reference.forward_features(x)["x_norm_patchtokens"], half.forward_features(x)["x_norm_patchtokens"]
    torch.testing.assert_close(b.float(), a, atol=0.05, rtol=0.05)


LOADER = """
import json, sys, torch
from dinoseg.models.backbones import make_backbone
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith(key + ':'))
dtype = getattr(torch, sys.argv[2])
# Warm up on a tiny file first: the library code a load runs is paged in once, and is not the load's memory.
make_backbone('dinov3_vitb16', weights=sys.argv[3], dtype=dtype, embed_dim=32, depth=1, num_heads=2)
open('/proc/self/clear_refs', 'w').write('5')  # the peak (VmHWM) restarts from the current resident size
before = status('VmRSS')
model = make_backbone('dinov3_vitb16', weights=sys.argv[1], dtype=dtype)
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({'extra': status('VmHWM') - before, 'size': size, 'dtype': str(model.blocks[0].attn.qkv.weight.dtype)}))
"""


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_streamed_loading_peak_memory(tmp_path, dtype):
    """Loading a float32 ViT-B file (344 MB) never holds a float32 copy: host memory peaks at most 1.2x the
    model's size in the dtype it runs in (measured in a fresh process)."""
    path = tmp_path / "dinov3_vitb16.pth"
    torch.save(DinoVisionTransformer(embed_dim=768, depth=12, num_heads=12, n_storage_tokens=4, mask_k_bias=True,
                                     layerscale_init=1e-5, pos_embed_rope_dtype="fp32", device="meta")
               .to_empty(device="cpu").state_dict(), path)
    tiny = tmp_path / "tiny.pth"
    torch.save(DinoVisionTransformer(embed_dim=32, depth=1, num_heads=2, n_storage_tokens=4, mask_k_bias=True,
                                     layerscale_init=1e-5, pos_embed_rope_dtype="fp32").state_dict(), tiny)
    run = subprocess.run([sys.executable, "-c", LOADER, str(path), dtype, str(tiny)], capture_output=True, text=True,
                         env=cli_env(), cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["dtype"] == f"torch.{dtype}"
    assert got["extra"] <= 1.2 * got["size"], json.dumps(got)


def test_config_weights_dtype_for_training_and_inference(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *tiny(out, total_iter=4, checkpoint_interval=4), "model.weights_dtype=bfloat16"]) == 0
    ckpt = torch.load(out / LAST, map_location="cpu", weights_only=True)
    assert all(v.dtype != torch.bfloat16 for v in ckpt["model"].values())  # the trained head keeps float32 weights
    from dinoseg.eval.segmentation.config import load_config
    from dinoseg.eval.segmentation.run import load_segmentor

    cfg = load_config([out / "segmentation_config.yaml"], [f"head={out / LAST}"])
    model, _ = load_segmentor(cfg, torch.device("cpu"))
    assert model.segmentation_model[1].conv.weight.dtype == torch.bfloat16  # inference: the head in half too
    assert model.segmentation_model[1].batchnorm_layer.weight.dtype == torch.float32
    assert main(["eval", str(out / "segmentation_config.yaml"), f"head={out / LAST}"]) == 0


def test_config_weights_dtype_for_depth_training_and_inference(tmp_path):
    from dinoseg.eval.depth.config import load_config
    from dinoseg.eval.depth.run import load_depther

    from ._depth_run import tiny_depth

    out = tmp_path / "run"
    assert main(["train", *tiny_depth(out, total_iter=4, checkpoint_interval=4), "model.weights_dtype=bfloat16"]) == 0
    ckpt = torch.load(out / LAST, map_location="cpu", weights_only=True)
    assert all(v.dtype != torch.bfloat16 for v in ckpt["model"].values())  # the trained head keeps float32 weights
    cfg = load_config([out / "depth_config.yaml"], [f"head={out / LAST}"])
    model = load_depther(cfg, torch.device("cpu"))
    assert model.encoder.backbone.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.decoder.conv_depth.weight.dtype == torch.bfloat16  # inference: the head in half too
    assert model.decoder.batchnorm_layer.weight.dtype == torch.float32
    full = load_depther(load_config([out / "depth_config.yaml"], [f"head={out / LAST}", "model.weights_dtype=float32"]),
                        torch.device("cpu"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = full(x), model(x)
    assert got.dtype == torch.float32 and (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert main(["eval", str(out / "depth_config.yaml"), f"head={out / LAST}"]) == 0
