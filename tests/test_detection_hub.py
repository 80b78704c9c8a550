"""The hub detector: the released architecture on the meta device (official keys, parameter counts), local-only
weights, strict loading of head files, half precision and the official `DetectorWithProcessor` output."""

import importlib.util
import re
import resource
from pathlib import Path

import pytest
import torch

from dinoseg.eval.detection.config import DetectionHeadConfig
from dinoseg.eval.detection.models.detr import PlainDETRReParam
from dinoseg.eval.detection.models.released import N_WINDOWS_SQRT
from dinoseg.hub import detectors as hub_detectors
from dinoseg.hub.detectors import DetectionWeights, DetectorWithProcessor, _make_dinov3_detector, dinov3_vit7b16_de
from dinoseg.models import CheckpointError, make_backbone
from dinoseg.models.frozen import frozen_prefixes, head_state_dict

from .test_detection_models import FIXTURES, _fixture

REPO = Path(__file__).resolve().parents[1]
HEAD_FILE = "dinov3_vit7b16_coco2017_detr_head-b0235ff7.pth"


def detr_head_parameters(in_channels, d=768, heads=8, ffn=2048, dec=6, enc=6, rpe=512, classes=91, queries=3000):
    """Parameters of the released detector head, counted layer by layer from the architecture (not from the code
    under test): two-stage, box refinement, mixed selection, four proposal levels, pre-norm decoder."""
    def linear(i, o, bias=True):
        return i * o + (o if bias else 0)

    n = linear(in_channels, d) + 2 * d  # input projection (1x1 conv) + GroupNorm
    n += queries * d  # query content (mixed selection)
    n += (dec + 1) * (linear(d, classes) + 2 * linear(d, d) + linear(d, 4))  # class + 3-layer box heads per layer + proposals
    n += d  # level embedding
    n += linear(d, d) + 2 * d + linear(2 * d, 2 * d) + 4 * d  # proposal memory projection, proposal position projection
    conv = 4 * d * d + d  # 2x2 stride-2 (transposed) convolution
    n += conv + conv + 2 * conv + 2 * d  # proposal levels at strides 8, 16 (identity), 32, 64 (two convs + LayerNorm)
    attention = 4 * d * d + 4 * d
    n += enc * (attention + linear(d, 2048) + linear(2048, d) + 4 * d)  # encoder: its FFN is 2048 wide, officially
    cross = 2 * (linear(2, rpe) + linear(rpe, heads, bias=False)) + 4 * linear(d, d)  # decomposed box bias + q, k, v, proj
    n += dec * (cross + attention + linear(d, ffn) + linear(ffn, d) + 6 * d) + 2 * d  # + the final norm
    return n


VIT7B = 6_716_043_264
DE_HEAD = detr_head_parameters(2 * 4 * 4096)  # 3 x 3 windows + whole view: twice four layers of 4096 channels
VITL_PLUS_HEAD = detr_head_parameters(2 * 4 * 1024)


def templates(keys) -> set[str]:
    return {re.sub(r"\.\d+(?=\.)", ".#", k) for k in keys}


def test_hub_detector_on_the_meta_device():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = torch.hub.load(str(REPO), "dinov3_vit7b16_de", source="local", trust_repo=True, pretrained=False,
                           device="meta")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 300
    assert isinstance(model, DetectorWithProcessor) and not model.training
    detector = model.detector
    assert type(detector) is PlainDETRReParam and all(p.is_meta for p in detector.parameters())
    params = dict(detector.named_parameters())
    vit_prefix = "backbone.0._backbone.backbone."
    assert sum(p.numel() for n, p in params.items() if n.startswith(vit_prefix)) == VIT7B
    assert sum(p.numel() for n, p in params.items() if not n.startswith(vit_prefix)) == DE_HEAD == 129_070_745
    keys = list(detector.state_dict())
    vit = make_backbone("dinov3_vit7b16", pretrained=False, device="meta")
    assert {k for k in keys if k.startswith(vit_prefix)} == {vit_prefix + k for k in vit.state_dict()}
    # The head keys follow the official layout of the (tiny, same-settings) windowed reparam fixture ...
    reference = [k for k in _fixture(FIXTURES[1])["state_dict"] if not k.startswith(vit_prefix)]
    head = [k for k in keys if not k.startswith(vit_prefix)]
    assert templates(head) == templates(reference)
    # ... with the hub's counts: 6 decoder and 6 encoder layers, 7 class / box heads, 4 proposal levels.
    assert {k for k in head if k.startswith("transformer.decoder.layers.")} == {
        f"transformer.decoder.layers.{i}.{k.split('.', 4)[4]}" for i in range(6)
        for k in reference if k.startswith("transformer.decoder.layers.0.")}
    assert {int(k.split(".")[3]) for k in head if k.startswith("transformer.encoder.layers.")} == set(range(6))
    assert {int(k.split(".")[1]) for k in head if k.startswith("class_embed.")} == set(range(7))
    frozen = tuple(frozen_prefixes(detector))
    assert frozen == (vit_prefix,) and [k for k in keys if not k.startswith(frozen)] == head  # a head checkpoint


def test_hub_detector_settings():
    model = dinov3_vit7b16_de(pretrained=False, device="meta")
    detector = model.detector
    windows = detector.backbone[0]
    assert windows._n_windows_h == windows._n_windows_w == 3 and windows._backbone.layers_to_use == [9, 19, 29, 39]
    assert detector.num_queries == 3000 and detector.num_queries_one2one == 1500
    assert detector.transformer.two_stage_num_proposals == 3000
    assert detector.transformer.proposal_tgt_strides == [8, 16, 32, 64] and detector.transformer.d_model == 768
    assert model.postprocessor.topk == 1500 and model.postprocessor.reparam
    assert {m.p for m in detector.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    # The official hub also wires the ViT-L/16+ (2 x 2 windows, no released head).
    plus = _make_dinov3_detector(backbone_name="dinov3_vitl16plus", pretrained=False, detector_weights=None,
                                 backbone_weights="LVD1689M", device="meta").detector
    assert plus.backbone[0]._n_windows_h == 2 and plus.backbone[0]._backbone.layers_to_use == [5, 11, 17, 23]
    assert sum(p.numel() for n, p in plus.named_parameters() if not n.startswith("backbone.")) == VITL_PLUS_HEAD
    with pytest.raises(ValueError, match="no detector for backbone 'dinov3_vitb16'"):
        _make_dinov3_detector(backbone_name="dinov3_vitb16", pretrained=False, detector_weights=None,
                              backbone_weights="LVD1689M")
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert hubconf.dinov3_vit7b16_de is dinov3_vit7b16_de


def test_released_head_is_never_downloaded_implicitly(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(CheckpointError, match=f"{HEAD_FILE}: the official COCO2017 detector head .* never downloads"):
        dinov3_vit7b16_de()
    with pytest.raises(CheckpointError, match="dinov3_vit7b16_coco2017_detr_head-0123abcd.pth"):
        dinov3_vit7b16_de(weights="coco2017", hash="0123abcd")
    with pytest.raises(ValueError, match="dinov3_vitl16plus detector: there is no released COCO2017 head"):
        _make_dinov3_detector(backbone_name="dinov3_vitl16plus", detector_weights=DetectionWeights.COCO2017,
                              backbone_weights="LVD1689M")
    with pytest.raises(CheckpointError, match="missing.pth: checkpoint file not found"):
        dinov3_vit7b16_de(weights=str(tmp_path / "missing.pth"))


SMALL_HEAD = DetectionHeadConfig(num_classes=5, num_queries_one2one=6, num_queries_one2many=10, topk=8, dec_layers=2,
                                 dim_feedforward=64, hidden_dim=64, nheads=4, decoder_rpe_hidden_dim=16,
                                 num_encoder_layers=1, k_one2many=2)
ARCH = dict(embed_dim=64, depth=4, num_heads=4)  # a tiny ViT of the 7B's kind (SwiGLU, untied norms, no qkv bias)


@pytest.fixture
def released_files(tmp_path, monkeypatch):
    """A small detector of the released layout and its two files: the backbone, and the head in the torch hub cache
    as the official file stores it (``{"model": head}``)."""
    monkeypatch.setattr(hub_detectors, "released_head_config", lambda *, backbone_name: DetectionHeadConfig(
        **{**vars(SMALL_HEAD), "n_windows_sqrt": N_WINDOWS_SQRT[backbone_name]}))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(0)
    reference = dinov3_vit7b16_de(pretrained=False, backbone_options=ARCH)
    backbone_file = tmp_path / "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"
    torch.save(reference.detector.backbone[0]._backbone.backbone.state_dict(), backbone_file)
    (tmp_path / "checkpoints").mkdir()
    head = head_state_dict(reference.detector)
    torch.save({"model": head}, tmp_path / "checkpoints" / HEAD_FILE)
    return reference, str(backbone_file), head, tmp_path


def _images():
    torch.manual_seed(1)
    return [torch.randn(3, 96, 128), torch.randn(3, 112, 96)]


def test_pretrained_detector_loads_local_files_strictly(released_files):
    reference, backbone_file, head, tmp_path = released_files
    images = _images()
    with torch.no_grad():
        expected = reference(images)
    for weights in ("COCO2017", DetectionWeights.COCO2017, str(tmp_path / "checkpoints" / HEAD_FILE)):
        loaded = dinov3_vit7b16_de(weights=weights, backbone_weights=backbone_file, backbone_options=ARCH)
        assert not loaded.training and not any(t.is_meta for t in loaded.state_dict().values())
        with torch.no_grad():
            got = loaded(images)
        for a, b in zip(got, expected):
            for key in ("scores", "labels", "boxes"):
                torch.testing.assert_close(a[key], b[key])
    # The box and class heads are one tensor under two names: a file with one of the names loads.
    single = {k: v for k, v in head.items() if not k.startswith(("transformer.decoder.bbox_embed.",
                                                                  "transformer.decoder.class_embed."))}
    torch.save(single, tmp_path / "single.pth")
    dinov3_vit7b16_de(weights=str(tmp_path / "single.pth"), backbone_weights=backbone_file, backbone_options=ARCH)


@pytest.mark.parametrize("change, message", [
    (lambda h: h.pop("query_embed.weight"), r"does not fit the configured model: 1 missing keys: query_embed.weight"),
    (lambda h: h.update(extra=torch.zeros(1)), r"1 unexpected keys: extra"),
    (lambda h: h.update({"input_proj.0.0.weight": torch.zeros(64, 8, 1, 1)}), r"1 shape mismatches: input_proj.0.0.weight"),
    (lambda h: h.update({"backbone.0._backbone.backbone.cls_token": torch.zeros(1, 1, 64)}), r"holds 1 backbone keys"),
    (lambda h: h.update({"transformer.decoder.bbox_embed.0.layers.0.bias": torch.ones(64)}), r"are one tensor .* differ"),
])
def test_head_files_that_do_not_fit_are_refused_naming_the_keys(released_files, change, message):
    _, backbone_file, head, tmp_path = released_files
    wrong = dict(head)
    change(wrong)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=f"wrong.pth: .*{message}"):
        dinov3_vit7b16_de(weights=str(tmp_path / "wrong.pth"), backbone_weights=backbone_file, backbone_options=ARCH)


def test_pretrained_detector_in_half_precision(released_files):
    reference, backbone_file, _, _ = released_files
    half = dinov3_vit7b16_de(weights="COCO2017", backbone_weights=backbone_file, backbone_options=ARCH,
                             dtype=torch.bfloat16)
    dtypes = {n: t.dtype for n, t in half.detector.named_parameters()}
    assert dtypes["backbone.0._backbone.backbone.blocks.0.attn.qkv.weight"] == torch.bfloat16
    assert dtypes["backbone.0._backbone.backbone.norm.weight"] == torch.float32
    assert dtypes["transformer.decoder.layers.0.linear1.weight"] == torch.bfloat16
    assert dtypes["transformer.decoder.layers.0.norm1.weight"] == torch.float32
    images = _images()
    with torch.no_grad():
        got, expected = half.detector(images), reference.detector(images)
        results = half(images)
    # Proposals (not re-ranked, unlike queries) stay close to the float32 ones; outputs come back in float32.
    assert got["pred_logits"].dtype == torch.float32
    diff = (got["enc_outputs"]["pred_boxes"] - expected["enc_outputs"]["pred_boxes"]).abs()
    assert (diff / expected["enc_outputs"]["pred_boxes"].abs().clamp(min=1)).max() < 0.02
    assert results[0]["boxes"].dtype == torch.float32


def test_detector_with_processor_output(released_files):
    reference, *_ = released_files
    images = _images()
    with torch.no_grad():
        results = reference(images)
    assert len(results) == 2
    for result, image in zip(results, images):
        assert set(result) == {"scores", "labels", "boxes"}
        assert result["scores"].shape == (8,) and (result["scores"][:-1] >= result["scores"][1:]).all()
        assert result["labels"].max() < 5
        h, w = image.shape[-2:]
        boxes = result["boxes"]
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
    with torch.no_grad():
        batch = torch.stack([images[0], images[0]])
        torch.testing.assert_close(reference(batch)[1]["boxes"], reference([images[0]])[0]["boxes"], atol=1e-4, rtol=1e-5)
