"""ViT-Adapter + Mask2Former: official parity, odd input sizes, training, inference, hub segmentors."""

import resource

import pytest
import torch
import torch.nn.functional as F

from dinoseg.eval.segmentation.models import AdapterOptions, Mask2FormerOptions, build_segmentation_decoder
from dinoseg.eval.segmentation.models.heads.mask2former_transformer_decoder import (
    MultiScaleMaskedTransformerDecoder,
)
from dinoseg.eval.segmentation.models.utils.ms_deform_attn import MSDeformAttn
from dinoseg.hub import segmentors
from dinoseg.hub.segmentors import dinov3_vit7b16_ms, dinov3_vits16_ade20k_linear
from dinoseg.models import ARCHS, CheckpointError
from dinoseg.models.vision_transformer import DinoVisionTransformer

from .conftest import SHARED_REFERENCE, load_fixture

SMALL = "m2f_small_on_vit_mlp.pt"
FULL = "m2f_on_vit_mlp.pt"
COUNTS = ("num_queries", "nheads", "dim_feedforward", "enc_layers", "dec_layers", "pixel_decoder_nheads")
ADAPTER_BACKBONE = "segmentation_model.0.backbone."
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def build_like(index: dict, name: str, **kwargs):
    spec = index[name]
    backbone = DinoVisionTransformer(**spec["official_kwargs"])
    return build_segmentation_decoder(
        backbone,
        backbone_out_layers=spec["backbone_out_layers"],
        decoder_type="m2f",
        hidden_dim=spec["hidden_dim"],
        num_classes=spec["num_classes"],
        m2f_options=Mask2FormerOptions(**{k: spec[k] for k in COUNTS}),
        **kwargs,
    )


def full_state_dict(fixture: dict) -> dict:
    state_dict = dict(fixture["state_dict_without_backbone"])
    state_dict.update({ADAPTER_BACKBONE + k: v for k, v in fixture["backbone_state_dict"].items()})
    return state_dict


def loaded(index: dict, name: str, fixture: dict, impl: str = "auto"):
    model = build_like(index, name)
    model.load_state_dict(full_state_dict(fixture), strict=True)
    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            m.impl = impl
    return model.eval()


@pytest.fixture(scope="module")
def small():
    return load_fixture(SMALL)


def assert_parity(model, fixture):
    x = fixture["x"]
    out = model.predict(x, rescale_to=x.shape[-2:])
    assert set(out) == {"pred_logits", "pred_masks"}
    torch.testing.assert_close(out["pred_logits"], fixture["pred_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["pred_masks"], fixture["pred_masks"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["grid_sample", "gather"])
def test_small_official_m2f_parity(official_index, small, impl):
    assert_parity(loaded(official_index, SMALL, small, impl), small)


@pytest.mark.skipif(not (SHARED_REFERENCE / FULL).exists(), reason="full-size M2F fixture only in ../shared/reference")
def test_full_size_official_m2f_parity(official_index):
    fixture = torch.load(SHARED_REFERENCE / FULL, map_location="cpu", weights_only=True)
    assert_parity(loaded(official_index, FULL, fixture), fixture)


def test_batched_images_do_not_mix(official_index, small):
    # Per-image masked attention (the batch-major head layout of the masks) and shared reference points.
    model = loaded(official_index, SMALL, small, impl="gather")
    x = torch.cat([small["x"], torch.randn(1, 3, 64, 96)])
    batched = model.predict(x, rescale_to=(64, 96))
    for i in range(2):
        single = model.predict(x[i : i + 1], rescale_to=(64, 96))
        torch.testing.assert_close(batched["pred_logits"][i : i + 1], single["pred_logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched["pred_masks"][i : i + 1], single["pred_masks"], atol=1e-5, rtol=1e-5)


def test_odd_input_sizes_are_padded_and_cropped(official_index, small):
    model = loaded(official_index, SMALL, small)
    adapter = model.segmentation_model[0]
    x = torch.randn(1, 3, 100, 130)
    with torch.no_grad():
        feats = adapter(x)
        # Same as running the zero-padded 128 x 160 image and cropping each level to ceil(side / stride).
        padded = adapter(F.pad(x, (0, 30, 0, 28)))
    for key, stride in zip("1234", (4, 8, 16, 32)):
        size = (-(-100 // stride), -(-130 // stride))
        assert feats[key].shape == (1, 64, *size)
        torch.testing.assert_close(feats[key], padded[key][..., : size[0], : size[1]])
    out = model.predict(x, rescale_to=(100, 130))
    assert out["pred_masks"].shape == (1, 10, 100, 130) and out["pred_logits"].shape == (1, 10, 8)
    assert torch.isfinite(out["pred_masks"]).all()


def test_training_step_reaches_adapter_and_head_only(official_index, small):
    model = loaded(official_index, SMALL, small)
    model.train()
    backbone = model.segmentation_model[0].backbone
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    out = model(torch.randn(2, 3, 64, 64))
    assert out["pred_logits"].shape == (2, 10, 8) and out["pred_masks"].shape == (2, 10, 16, 16)
    assert len(out["aux_outputs"]) == official_index[SMALL]["dec_layers"]
    loss = out["pred_masks"].sigmoid().mean() + out["pred_logits"].logsumexp(-1).mean()
    loss = loss + sum(a["pred_masks"].sigmoid().mean() for a in out["aux_outputs"])
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(not n.startswith(ADAPTER_BACKBONE) for n, _ in trainable)
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, no_grad


def test_fully_masked_queries_attend_everywhere():
    decoder = MultiScaleMaskedTransformerDecoder(
        32, num_classes=5, hidden_dim=32, num_queries=3, nheads=2, dim_feedforward=16, dec_layers=3, mask_dim=32
    ).eval()
    levels = [torch.randn(1, 32, s, s) for s in (2, 3, 4)]
    mask_features = torch.rand(1, 32, 8, 8) + 0.1
    last = decoder.mask_embed.layers[-1]
    torch.nn.init.zeros_(last.weight)
    outputs = []
    for sign in (-1.0, 1.0):  # every mask predicted empty (all keys masked), then full (no key masked)
        torch.nn.init.constant_(last.bias, sign)
        outputs.append(decoder(levels, mask_features)["pred_logits"])
    # Without the rule the first case would be a softmax over nothing (NaN); with it both see every key.
    assert torch.isfinite(outputs[0]).all()
    torch.testing.assert_close(outputs[0], outputs[1])


def test_bfloat16_autocast_on_cpu(official_index, small):
    model = loaded(official_index, SMALL, small)
    model.autocast_dtype = torch.bfloat16
    out = model.predict(small["x"], rescale_to=(64, 96))
    assert torch.isfinite(out["pred_masks"].float()).all()
    torch.testing.assert_close(out["pred_logits"].float(), small["pred_logits"], atol=0.05, rtol=0.05)
    torch.testing.assert_close(out["pred_masks"].float(), small["pred_masks"], atol=0.1, rtol=0.05)


def test_slide_inference_turns_mask_classification_into_class_scores(official_index, small):
    inference = pytest.importorskip("dinoseg.eval.segmentation.inference")
    model = loaded(official_index, SMALL, small)
    x = small["x"]
    # One window covering the image: the official outputs, turned into per-class scores.
    scores = inference.slide_inference(x, model, crop_size=(64, 96), stride=(64, 96))
    probs = small["pred_logits"].softmax(-1)[..., :-1]
    expected = torch.einsum("bqc,bqhw->bchw", probs, small["pred_masks"].sigmoid())
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    # Two overlapping windows: columns 32..63 are the mean of both.
    scores = inference.slide_inference(x, model, crop_size=64, stride=32, crop_batch_size=2)
    left, right = (model.predict(x[..., a : a + 64], rescale_to=(64, 64)) for a in (0, 32))
    left, right = (inference.mask_classification_to_semantic(o["pred_logits"], o["pred_masks"]) for o in (left, right))
    torch.testing.assert_close(scores[..., :32], left[..., :32], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[..., 32:64], (left[..., 32:] + right[..., :32]) / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[..., 64:], right[..., 32:], atol=1e-5, rtol=1e-5)


# -- parameter count of the released 7B segmentor ----------------------------------------------------------------


def m2f_param_count(E, Hd, K, Q=100, F=4096, enc=6, dec=9, Md=16, Mp=16, inplanes=64, points=4, extractors=6):
    """Parameters of ViT-Adapter (embed E) + Mask2Former (hidden Hd, K classes), counted by hand."""
    c1, c2, c3 = inplanes, 2 * inplanes, 4 * inplanes
    spm = 9 * (3 * c1 + c1 * c1 * 2 + c1 * c2 + c2 * c3 + c3 * c3) + 2 * (3 * c1 + c2 + 2 * c3)
    spm += (c1 + c2 + 2 * c3) * E + 4 * E
    v, h = E // 2, E // 4
    attn = E * Md * points * 3 + Md * points * 3 + 2 * E * v + v + E
    extractor = 6 * E + attn + (E * h + h) + 10 * h + (h * E + E)
    adapter = 3 * E + spm + extractors * extractor + 4 * E * E + E + 8 * E
    enc_attn = Hd * Mp * 3 * points * 3 + Mp * 3 * points * 3 + 2 * (Hd * Hd + Hd)
    enc_layer = enc_attn + 4 * Hd + Hd * F + F + F * Hd + Hd
    pixel_decoder = 3 * (E * Hd + 3 * Hd) + 3 * Hd + enc * enc_layer + Hd * Hd + Hd + E * Hd + 2 * Hd + 9 * Hd * Hd + 2 * Hd
    mha = 4 * Hd * Hd + 4 * Hd + 2 * Hd
    dec_layer = 2 * mha + Hd * F + F + F * Hd + Hd + 2 * Hd
    predictor = dec * dec_layer + 2 * Hd + 2 * Q * Hd + 3 * Hd + Hd * (K + 1) + K + 1 + 3 * (Hd * Hd + Hd)
    return adapter + pixel_decoder + predictor


def test_vit7b_segmentor_builds_on_meta_with_the_released_size(official_index, small):
    # The hand count is right for the official small fixture (trainable tensors, i.e. without BN statistics)...
    spec = official_index[SMALL]
    fixture_params = sum(
        v.numel() for k, v in small["state_dict_without_backbone"].items() if not k.endswith(BN_BUFFERS)
    )
    small_counts = dict(Q=spec["num_queries"], F=spec["dim_feedforward"], enc=spec["enc_layers"], dec=spec["dec_layers"])
    assert m2f_param_count(64, 64, 7, Mp=spec["pixel_decoder_nheads"], **small_counts) == fixture_params
    # ... and the 7B segmentor has exactly the backbone plus that count at embed 4096, hidden 2048, 150 classes.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = dinov3_vit7b16_ms(pretrained=False, device="meta")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"meta construction allocated {grown_mib:.0f} MiB"
    tensors = list(model.state_dict().values())
    assert all(t.is_meta for t in tensors)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 6_716_043_264 + m2f_param_count(4096, 2048, 150) == 7_643_463_639
    assert model.autocast_dtype == torch.bfloat16
    assert model.segmentation_model[0].interaction_indexes == [9, 19, 29, 39]
    assert model.segmentation_model[1].predictor.class_embed.out_features == 151


# -- hub loading from local files ----------------------------------------------------------------------------------

TINY_7B = dict(embed_dim=64, depth=4, num_heads=2)  # the 7B layout (SwiGLU64, no qkv bias), made tiny
TINY_HEAD = dict(hidden_dim=32, m2f_options=Mask2FormerOptions(
    num_queries=4, nheads=2, dim_feedforward=32, enc_layers=1, dec_layers=2, pixel_decoder_nheads=2,
    adapter=AdapterOptions(conv_inplane=16, deform_num_heads=4)))


def save_split(tmp_path, model, backbone_prefix):
    state = model.state_dict()
    backbone = {k[len(backbone_prefix):]: v for k, v in state.items() if k.startswith(backbone_prefix)}
    head = {k: v for k, v in state.items() if not k.startswith(backbone_prefix)}
    torch.save(backbone, tmp_path / "backbone.pth")
    torch.save(head, tmp_path / "head.pth")
    return str(tmp_path / "head.pth"), str(tmp_path / "backbone.pth"), head


def test_m2f_hub_segmentor_loads_local_files(tmp_path):
    kw = dict(backbone_options=TINY_7B, autocast_dtype=torch.float32, **TINY_HEAD)
    ref = dinov3_vit7b16_ms(pretrained=False, **kw).eval()
    torch.nn.init.normal_(ref.segmentation_model[1].predictor.class_embed.weight)
    head_path, backbone_path, head = save_split(tmp_path, ref, ADAPTER_BACKBONE)
    model = dinov3_vit7b16_ms(weights=head_path, backbone_weights=backbone_path, **kw).eval()
    assert not any(t.is_meta for t in model.state_dict().values())
    x = torch.randn(1, 3, 64, 64)
    expected, got = ref.predict(x, rescale_to=(64, 64)), model.predict(x, rescale_to=(64, 64))
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"])
    torch.testing.assert_close(got["pred_masks"], expected["pred_masks"])

    # Strict: a missing head key and a stray backbone key are named, with the file.
    key = "segmentation_model.1.predictor.query_feat.weight"
    torch.save({k: v for k, v in head.items() if k != key}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth.*1 missing keys: " + key.replace(".", r"\.")):
        dinov3_vit7b16_ms(weights=str(tmp_path / "bad.pth"), backbone_weights=backbone_path, **kw)
    torch.save({**head, ADAPTER_BACKBONE + "cls_token": torch.zeros(1, 1, 64)}, tmp_path / "full.pth")
    with pytest.raises(CheckpointError, match=r"full\.pth: head checkpoint holds 1 backbone keys"):
        dinov3_vit7b16_ms(weights=str(tmp_path / "full.pth"), backbone_weights=backbone_path, **kw)
    # A missing head file is reported before the (multi-GB) backbone is read.
    with pytest.raises(CheckpointError, match=r"nowhere\.pth: checkpoint file not found"):
        dinov3_vit7b16_ms(weights=str(tmp_path / "nowhere.pth"), backbone_weights="/nonexistent/backbone.pth", **kw)


def test_official_head_name_is_looked_up_in_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(CheckpointError, match="dinov3_vit7b16_ade20k_m2f_head-bf307cb1.pth.*never downloads"):
        dinov3_vit7b16_ms(backbone_weights="/nonexistent/backbone.pth")


def test_linear_hub_segmentors(tmp_path):
    linear = {n for n in segmentors.__all__ if n.endswith("_ade20k_linear")}
    assert linear == {f"{name}_ade20k_linear" for name in ARCHS}
    tiny = dict(embed_dim=32, depth=4, num_heads=2)
    ref = dinov3_vits16_ade20k_linear(pretrained=False, backbone_options=tiny, backbone_out_layers="FOUR_EVEN_INTERVALS")
    ref.eval()
    head_path, backbone_path, _ = save_split(tmp_path, ref, "segmentation_model.0.feature_model.")
    model = dinov3_vits16_ade20k_linear(
        weights=head_path, backbone_weights=backbone_path, backbone_options=tiny, backbone_out_layers="FOUR_EVEN_INTERVALS"
    ).eval()
    x = torch.randn(1, 3, 48, 64)
    torch.testing.assert_close(model.predict(x, rescale_to=(48, 64)), ref.predict(x, rescale_to=(48, 64)))
    assert model.predict(x, rescale_to=(48, 64)).shape == (1, 150, 48, 64)
    # A 4-layer head loaded with the default LAST layer set: the error says what to change.
    with pytest.raises(CheckpointError, match="shape mismatches.*set backbone_out_layers"):
        dinov3_vits16_ade20k_linear(weights=head_path, backbone_weights=backbone_path, backbone_options=tiny)
    with pytest.raises(ValueError, match="no released ADE20K head"):
        dinov3_vits16_ade20k_linear(weights="ADE20K", backbone_weights=backbone_path, backbone_options=tiny)
