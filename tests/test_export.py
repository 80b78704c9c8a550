"""ONNX export of segmentors (`dinoseg export`) and running the file with onnxruntime (`predict --onnx`)."""

import json
import logging
import re
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from dinoseg.cli import main
from dinoseg.engine import export as engine_export
from dinoseg.engine.checkpoint import LAST
from dinoseg.eval.segmentation import export as export_module
from dinoseg.eval.segmentation.config import load_config
from dinoseg.eval.segmentation.export import ExportError, deployment_metadata, export_onnx
from dinoseg.eval.segmentation.inference import InferenceMode, _class_scores, make_inference, make_tta_inference
from dinoseg.eval.segmentation.models import build_segmentation_decoder
from dinoseg.eval.segmentation.models.utils.ms_deform_attn import MSDeformAttn
from dinoseg.eval.segmentation.onnx_runtime import OnnxSegmentor
from dinoseg.eval.segmentation.setup import build_model
from dinoseg.eval.segmentation.transforms import make_single_view_eval_transforms
from dinoseg.layers.rope_position_encoding import RopePositionEmbedding
from dinoseg.models.frozen import head_state_dict
from dinoseg.models.vision_transformer import DinoVisionTransformer

from .engine_utils import TINY, tiny
from .test_convnext_train import CONVNEXT_TINY
from .test_run_safety import error_of, snapshot

TINY_VIT = dict(patch_size=16, embed_dim=32, depth=4, num_heads=2, n_storage_tokens=4, layerscale_init=1e-5,
                mask_k_bias=True, pos_embed_rope_dtype="fp32")
NAMES = ["background", "disc", "square", "triangle", "ring"]
PALETTE = [[0, 0, 0], [200, 10, 10], [10, 200, 10], [10, 10, 200], [250, 250, 0]]
METADATA = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), resize_short_side=64, inference_mode="slide",
                crop_size=48, stride=32, class_names=NAMES, palette=PALETTE)


def linear_segmentor(use_cls_token: bool = False, **vit_options) -> torch.nn.Module:
    model = build_segmentation_decoder(DinoVisionTransformer(**{**TINY_VIT, **vit_options}), "FOUR_LAST",
                                       decoder_type="linear", num_classes=5, use_cls_token=use_cls_token)
    head = model.segmentation_model[1]
    with torch.no_grad():  # a head with decisive logits and non-trivial BatchNorm statistics
        head.conv.weight.normal_(0, 1.0)
        head.batchnorm_layer.running_mean.normal_(0, 0.5)
        head.batchnorm_layer.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    torch.manual_seed(0)
    model = linear_segmentor()
    path = export_onnx(model, tmp_path_factory.mktemp("linear") / "segmentor.onnx",
                       metadata=deployment_metadata(**METADATA))
    return model, path


def assert_close(a, b, tol=1e-4):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol


def test_linear_export_matches_pytorch_on_two_sizes(linear):
    model, path = linear
    onnx_model = OnnxSegmentor(path)
    for shape in ((2, 3, 64, 96), (1, 3, 80, 48)):
        x = torch.randn(shape)
        # at the input size (the graph's class_scores) and resized (the graph's patch_logits, resized here)
        for size in (shape[-2:], (50, 77)):
            assert_close(onnx_model.predict(x, rescale_to=size), model.predict(x, rescale_to=size))
    # A consumer without dinoseg: onnxruntime alone, logits at the input resolution.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    x = torch.randn(3, 3, 32, 112)
    (scores,) = session.run(["class_scores"], {"image": x.numpy()})
    assert_close(torch.from_numpy(scores), model.predict(x, rescale_to=(32, 112)))


def test_metadata_round_trips(linear):
    _, path = linear
    props = {p.key: json.loads(p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props}
    expected = deployment_metadata(**METADATA)
    assert {k: props[k] for k in expected} == expected
    assert props["class_names"] == NAMES and props["palette"] == PALETTE and props["mean"] == [0.5, 0.4, 0.3]
    assert props["decoder"] == "linear" and props["num_classes"] == 5 and props["size_multiple"] == 16
    assert props["format"] == "dinoseg-segmentor/1" and props["task"] == "segmentation" and props["patch_size"] == 16
    assert props["input_size"] == "dynamic" and props["opset"] == 18
    assert props["outputs"] == ["class_scores", "patch_logits"]

    onnx_model = OnnxSegmentor(path)
    assert onnx_model.metadata == props
    assert onnx_model.class_names == NAMES and onnx_model.palette == [tuple(c) for c in PALETTE]
    raw = torch.randint(0, 256, (3, 40, 90), dtype=torch.uint8)
    label = torch.zeros(40, 90, dtype=torch.int64)
    ours, _ = onnx_model.eval_transforms()(raw, label)
    ref, _ = make_single_view_eval_transforms(64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))(raw, label)
    assert ours.shape == (3, 64, 144) and torch.equal(ours, ref)
    settings = onnx_model.inference_settings()
    assert (settings.mode, settings.crop_size, settings.stride) == (InferenceMode.SLIDE, (48, 48), (32, 32))
    assert (settings.tta_ratios, settings.use_flip, settings.whole_size) == ((1.0,), False, None)


def test_inference_functions_run_unchanged_on_the_onnx_segmentor(linear):
    model, path = linear
    onnx_model = OnnxSegmentor(path, threads=1)
    x = torch.randn(1, 3, 70, 100)
    for mode, crop in (("slide", (48, 48)), ("whole", (64, 96))):
        args = dict(inference_mode=mode, rescale_to=(70, 100), crop_size=crop, stride=(32, 32))
        assert_close(make_inference(x, onnx_model, **args), make_inference(x, model, **args))
    args = dict(rescale_to=(70, 100), tta_ratios=(1.0, 0.75), use_flip=True, crop_size=(48, 48), stride=(32, 32))
    assert_close(make_tta_inference(x, onnx_model, **args), make_tta_inference(x, model, **args), tol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        onnx_model.predict(torch.randn(1, 3, 40, 48), rescale_to=(40, 48))


def test_fixed_size_export(tmp_path):
    # Also: class tokens in the head, and a bfloat16 training precision (the graph is float32; the model keeps it).
    model = linear_segmentor(use_cls_token=True)
    model.autocast_dtype = torch.bfloat16
    path = export_onnx(model, tmp_path / "fixed.onnx", image_size=(48, 48), metadata=deployment_metadata(**METADATA))
    assert model.autocast_dtype == torch.bfloat16 and not model.training
    model.autocast_dtype = torch.float32
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 48, 48]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # the batch stays dynamic
    onnx_model = OnnxSegmentor(path)
    assert onnx_model.input_size == (48, 48) and onnx_model.metadata["input_size"] == [48, 48]
    x = torch.randn(3, 3, 48, 48)
    assert_close(onnx_model.predict(x, rescale_to=(48, 48)), model.predict(x, rescale_to=(48, 48)))
    with pytest.raises(ValueError, match="exported for 48x48 inputs, got 64x64"):
        onnx_model.predict(torch.randn(1, 3, 64, 64), rescale_to=(64, 64))
    assert onnx_model.inference_settings().whole_size == (48, 48)  # whole-image mode resizes to the fixed size


def test_a_dynamic_size_that_cannot_be_exact_falls_back_to_the_slide_crop(tmp_path, monkeypatch, caplog):
    original = RopePositionEmbedding._coords
    # A RoPE that reads the grid size as Python ints: the exported graph could not follow the input size.
    monkeypatch.setattr(RopePositionEmbedding, "_coords", lambda self, h, w: original(self, int(h), int(w)))
    model = linear_segmentor()
    with caplog.at_level(logging.WARNING, logger="dinoseg"):
        path = export_onnx(model, tmp_path / "s.onnx", metadata=deployment_metadata(**METADATA))
    assert "dynamic input size cannot be made exact" in caplog.text and "48 x 48" in caplog.text
    onnx_model = OnnxSegmentor(path)
    assert onnx_model.input_size == (48, 48)
    x = torch.randn(2, 3, 48, 48)
    assert_close(onnx_model.predict(x, rescale_to=(48, 48)), model.predict(x, rescale_to=(48, 48)))


def test_a_graph_that_fails_verification_is_never_written(tmp_path, monkeypatch):
    path = tmp_path / "segmentor.onnx"
    path.write_bytes(b"previous export")
    monkeypatch.setattr(engine_export, "VERIFY_TOLERANCE", -1.0)  # no difference is small enough
    with pytest.raises(ExportError, match="output class_scores: onnxruntime differs from PyTorch"):
        export_onnx(linear_segmentor(), path, image_size=(48, 48), metadata=deployment_metadata(**METADATA))
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["segmentor.onnx"]  # no temporary folder left behind


class _MaskedMean(torch.nn.Module):
    """Images and their padding mask in: the mean of each image's unpadded pixels (as detection's graph takes a mask)."""

    def forward(self, image, mask):
        valid = (~mask).unsqueeze(1).float()
        return ((image * valid).sum((2, 3)) / valid.sum((2, 3)).clamp(min=1),)


def test_a_fixed_size_graph_takes_extra_batched_inputs(tmp_path):
    def sample_mask(images, index):
        mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
        mask[-1, 10 + index:] = True
        return mask

    report = engine_export.write_onnx(_MaskedMean(), tmp_path / "masked.onnx", outputs=["means"], metadata={},
                                      size_multiple=8, image_size=(16, 24), extra_inputs={"mask": sample_mask})
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[1:]) for i in session.get_inputs()] == [("image", [3, 16, 24]), ("mask", [16, 24])]
    image, mask = torch.randn(3, 3, 16, 24), torch.rand(3, 16, 24) > 0.5  # another batch size, another mask
    (got,) = session.run(["means"], {"image": image.numpy(), "mask": mask.numpy()})
    assert_close(torch.from_numpy(got), _MaskedMean()(image, mask)[0])
    with pytest.raises(ExportError, match=r"the inputs \['mask'\] after the images need a fixed image size"):
        engine_export.write_onnx(_MaskedMean(), tmp_path / "dynamic.onnx", outputs=["means"], metadata={},
                                 size_multiple=8, extra_inputs={"mask": sample_mask})


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (linear_segmentor, dict(opset=17), "opset 17: torch's ONNX exporter writes opset 18 or later"),
        (lambda: linear_segmentor(pos_embed_rope_dtype="bf16"), {},
         r"buffer segmentation_model.0.feature_model.rope_embed.periods is torch.bfloat16.*pos_embed_rope_dtype='fp32'"),
        (lambda: torch.nn.Conv2d(3, 5, 1), {}, "expected a segmentor built by build_segmentation_decoder"),
        (linear_segmentor, dict(image_size=(48, 40)), r"image_size \[48, 40\]: need two positive multiples of the patch"),
        (linear_segmentor, dict(image_size=(64, 64)), r"fixed-size graph for slide inference must take the 48 x 48 crops"),
        (linear_segmentor, dict(metadata={"mean": [0, 0, 0]}), "metadata lacks"),
        (linear_segmentor, dict(metadata=deployment_metadata(class_names=["a", "b"])),
         "metadata class_names has 2 entries; the segmentor has 5 classes"),
        (linear_segmentor, dict(metadata={**deployment_metadata(), "note": object()}), "JSON-serialisable"),
        (linear_segmentor, dict(metadata=deployment_metadata(palette=[[0, 0, 0]] * 6)),
         "metadata palette has 6 entries; the segmentor has 5 classes"),
    ],
)
def test_refusals_name_the_problem_and_write_nothing(tmp_path, make, kwargs, message):
    kwargs = {"metadata": deployment_metadata(**METADATA), **kwargs}
    with pytest.raises(ExportError, match=message):
        export_onnx(make(), tmp_path / "x.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_missing_extras_give_the_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    code = main(["predict", "--onnx", str(tmp_path / "s.onnx"), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err == ("dinoseg: error: predict --onnx needs the optional package(s) "
                                       "onnxruntime: pip install 'dinoseg[export]'\n")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ExportError, match=r"^exporting to ONNX needs the optional package\(s\) onnxruntime, onnxscript: "
                                          r"pip install 'dinoseg\[export\]'$"):
        export_onnx(linear_segmentor(), tmp_path / "x.onnx")


@pytest.mark.parametrize(("version", "decoder", "needed"), [("2.7.1", "linear", "2.8"), ("2.11.0+cpu", "m2f", "2.12")])
def test_a_torch_too_old_to_export_the_head_is_refused_in_one_line(tmp_path, monkeypatch, version, decoder, needed):
    """Older exporters fail deep inside torch.export (tried: torch 2.5-2.7 for the linear head, 2.8-2.11 for
    Mask2Former) with a coloured multi-line message; the version is checked first."""
    model = linear_segmentor() if decoder == "linear" else build_model(load_config([], M2F), 6).eval()
    name = {"linear": "linear", "m2f": "Mask2Former"}[decoder]
    message = f"exporting a {name} head needs torch>={needed} (this is torch {version}): pip install 'torch>={needed}'"
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(ExportError, match=f"^{re.escape(message)}$"):
        export_onnx(model, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(torch, "__version__", needed + ".0")  # the oldest one that works gets past the check
    engine_export.check_torch_version(export_module.MIN_TORCH[decoder], name)


def test_exporter_messages_lose_their_colours():
    e = RuntimeError("Failed to export. \x1b[96mThis is step 1/3\x1b[0m of exporting.\nmore")
    assert engine_export.first_line(e) == "Failed to export. This is step 1/3 of exporting."


def test_predict_onnx_refuses_config_arguments(tmp_path, capsys):
    assert main(["predict", "--onnx", "s.onnx", "head=h.pth", "-i", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "predict --onnx takes its settings from s.onnx; drop head=h.pth" in capsys.readouterr().err


def _images(folder, sizes):
    folder.mkdir()
    gen = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(gen.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def assert_same_outputs(a, b):
    names = sorted(p.name for p in a.glob("*.png"))
    assert names == sorted(p.name for p in b.glob("*.png")) and len(names) == 9
    for name in names:
        assert np.array_equal(np.array(Image.open(a / name)), np.array(Image.open(b / name))), name


@pytest.fixture(scope="module")
def trained_head(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", *tiny(out, total_iter=20)]) == 0
    return out / LAST


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_predict_onnx_writes_the_same_masks_as_predict(tmp_path, trained_head, mode, capsys):
    config = [*TINY, f"head={trained_head}", f"eval.mode={mode}"]
    images = _images(tmp_path / "in", [(64, 64), (50, 90), (97, 61)])
    assert main(["predict", *config, "-i", str(images), "-o", str(tmp_path / "torch")]) == 0
    onnx_file = tmp_path / "deploy" / "segmentor.onnx"
    assert main(["export", *config, "-o", str(onnx_file)]) == 0
    assert f"wrote {onnx_file}" in capsys.readouterr().out
    # Nothing but the file: no config, no backbone, no head checkpoint.
    assert main(["predict", "--onnx", str(onnx_file), "-i", str(images), "-o", str(tmp_path / "onnx")]) == 0
    assert_same_outputs(tmp_path / "torch", tmp_path / "onnx")
    meta = OnnxSegmentor(onnx_file).metadata
    assert meta["inference_mode"] == mode and meta["class_names"][:2] == ["background", "red stripes"]


# -- Mask2Former -----------------------------------------------------------------------------------------------

M2F = [*TINY, "decoder_head.type=m2f", "decoder_head.backbone_out_layers=FOUR_EVEN_INTERVALS",
       "decoder_head.hidden_dim=32", "decoder_head.num_classes=6", "decoder_head.m2f.num_queries=4",
       "decoder_head.m2f.nheads=2", "decoder_head.m2f.dim_feedforward=32", "decoder_head.m2f.enc_layers=1",
       "decoder_head.m2f.dec_layers=2", "decoder_head.m2f.pixel_decoder_nheads=2",
       "decoder_head.m2f.adapter.deform_num_heads=2", "decoder_head.m2f.adapter.conv_inplane=16",
       "decoder_head.m2f.adapter.with_cp=false", "eval.mode=whole"]


@pytest.fixture(scope="module")
def m2f(tmp_path_factory):
    """A tiny ViT-Adapter + Mask2Former segmentor with a random head (decisive class logits), exported through
    the CLI with a dynamic size."""
    folder = tmp_path_factory.mktemp("m2f")
    torch.manual_seed(0)
    cfg = load_config([], M2F)
    model = build_model(cfg, 6).eval()
    with torch.no_grad():
        model.segmentation_model[1].predictor.class_embed.weight.mul_(20)
    torch.save({"model": head_state_dict(model)}, folder / "head.pth")
    config = [*M2F, f"head={folder / 'head.pth'}"]
    assert main(["export", *config, "-o", str(folder / "m2f.onnx")]) == 0
    return model, folder / "m2f.onnx", config


def test_export_restores_the_deformable_attention_implementation(tmp_path, monkeypatch):
    # Exported through grid_sample (embedding_bag has no ONNX form); the model keeps its own choice after.
    cfg = load_config([], M2F)
    model = build_model(cfg, 6).eval()
    attns = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    seen = []

    def fake_write(module, *args, **kwargs):
        seen.extend(m.impl for m in attns)
        raise ExportError("stop")

    monkeypatch.setattr(export_module, "write_onnx", fake_write)
    with pytest.raises(ExportError, match="stop"):
        export_onnx(model, tmp_path / "x.onnx")
    assert attns and set(seen) == {"grid_sample"} and {m.impl for m in attns} == {"auto"}


@pytest.mark.slow
def test_m2f_export_matches_pytorch_on_two_sizes(m2f):
    model, path, _ = m2f
    onnx_model = OnnxSegmentor(path)
    assert onnx_model.decoder == "m2f" and onnx_model.input_size is None
    assert onnx_model.metadata["outputs"] == ["class_scores", "pred_logits", "pred_masks"]
    for shape, size in (((2, 3, 64, 96), (64, 96)), ((1, 3, 80, 48), (80, 48)), ((1, 3, 80, 48), (61, 93))):
        # 80 x 48 is padded to 96 x 64 inside the graph (the adapter needs multiples of 32)
        x = torch.randn(shape)
        ours, ref = onnx_model.predict(x, rescale_to=size), model.predict(x, rescale_to=size)
        assert isinstance(ours, torch.Tensor) == (size == shape[-2:])  # resized: the Mask2Former dict
        assert_close(_class_scores(ours), _class_scores(ref))


@pytest.mark.slow
def test_m2f_predict_onnx_writes_the_same_masks_as_predict(m2f, tmp_path):
    _, path, config = m2f
    images = _images(tmp_path / "in", [(64, 64), (50, 90), (97, 61)])
    assert main(["predict", *config, "-i", str(images), "-o", str(tmp_path / "torch")]) == 0
    assert main(["predict", "--onnx", str(path), "-i", str(images), "-o", str(tmp_path / "onnx")]) == 0
    assert_same_outputs(tmp_path / "torch", tmp_path / "onnx")


# -- what a hostile user tries (issue 20) ----------------------------------------------------------------------


def test_bad_output_paths_are_one_line_naming_them_and_leave_the_run_untouched(trained_head, tmp_path, capsys):
    """Row 9: each named a temporary file or a rename instead of the path given. Checked before the model loads."""
    run = trained_head.parent
    before = snapshot(run)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "somedir").mkdir()
    config = [str(run / "segmentation_config.yaml"), f"head={trained_head}"]
    for target, message in (
        ("/proc/x.onnx", "/proc/x.onnx: cannot write in /proc ("),
        (f"{tmp_path}/file/x.onnx", f"{tmp_path}/file/x.onnx: cannot create it, {tmp_path}/file is not a directory"),
        (f"{tmp_path}/somedir", f"{tmp_path}/somedir: is a directory; name the .onnx file to write"),
        (str(run / LAST), f"{run / LAST}: the exported file must end in .onnx"),  # a typo must not replace the head
    ):
        assert error_of(capsys, ["export", *config, "-o", target]).startswith(f"dinoseg: error: {message}")
    assert snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["file", "somedir"]


def test_a_failed_export_leaves_the_run_byte_identical(trained_head, tmp_path, capsys, monkeypatch):
    # Into a folder of the run that does not exist yet: created only once the graph is verified.
    run = trained_head.parent
    before = snapshot(run)
    monkeypatch.setattr(engine_export, "VERIFY_TOLERANCE", -1.0)  # no difference is small enough
    line = error_of(capsys, ["export", str(run / "segmentation_config.yaml"), f"head={trained_head}", "--size", "48", "48",
                             "-o", str(run / "deploy" / "x.onnx")])
    assert "output class_scores: onnxruntime differs from PyTorch" in line
    assert snapshot(run) == before and not (run / "deploy").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def _with_metadata(source, target, **changes):
    """A copy of an exported file with some metadata values replaced (JSON text) or removed (None)."""
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(changes)
    del model.metadata_props[:]
    for key, value in props.items():
        if value is not None:
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize("changes, message", [
    (dict(class_names='["a", "b"]'), """metadata class_names is ['a', 'b']; expected null or one entry per class (5)"""),
    (dict(palette="[[0, 0, 0]]"), "metadata palette is [[0, 0, 0]]; expected null or one entry per class (5)"),
    (dict(palette=json.dumps([[0, 0, 300]] * 5)), "metadata palette is [[0, 0, 300], "),
    (dict(num_classes="6"), "metadata num_classes is 6; expected the 5 channels of the graph's class_scores"),
    (dict(mean=None), "metadata lacks mean"),
    (dict(crop_size="48,"), "metadata crop_size is not JSON ('48,')"),
    (dict(inference_mode='"sliding"'), """metadata inference_mode is 'sliding'; expected "whole" or "slide\""""),
    (dict(input_size="[48]"), """metadata input_size is [48]; expected "dynamic" or [H, W]"""),
    (dict(tta_ratios="[]"), "metadata tta_ratios is []; expected a list of positive numbers"),
    (dict(format='"dinoseg-segmentor/9"'), "not a dinoseg export (metadata format is 'dinoseg-segmentor/9'; expected one of"),
])
def test_predict_onnx_checks_the_metadata(linear, tmp_path, capsys, changes, message):
    """Row 14: 2 class names for 5 classes were accepted. Each problem is one line naming the file and the key."""
    _, path = linear
    bad = _with_metadata(path, tmp_path / "bad.onnx", **changes)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    line = error_of(capsys, ["predict", "--onnx", str(bad), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")])
    assert line.startswith(f"dinoseg: error: {bad}: {message}"), line
    assert not (tmp_path / "out").exists()


def test_predict_onnx_refuses_files_that_are_not_exports(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    args = ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")]
    (tmp_path / "text.onnx").write_text("no protobuf at all\n" * 3)
    assert error_of(capsys, ["predict", "--onnx", str(tmp_path / "text.onnx"), *args]) == (
        f"dinoseg: error: {tmp_path / 'text.onnx'}: not an ONNX file")
    assert error_of(capsys, ["predict", "--onnx", str(tmp_path / "none.onnx"), *args]) == (
        f"dinoseg: error: {tmp_path / 'none.onnx'}: ONNX file not found")


def test_heads_of_another_head_type_are_named(trained_head, tmp_path, capsys):
    """Row 11 (segmentation side): a linear head given to a Mask2Former config, with and without the run's config
    in the checkpoint."""
    run = trained_head.parent
    config = [str(run / "segmentation_config.yaml"), "decoder_head.type=m2f", "-o", str(tmp_path / "x.onnx")]
    line = error_of(capsys, ["export", *config[:2], f"head={trained_head}", *config[2:]])
    assert line == (f"dinoseg: error: {trained_head}: this is a linear segmentation head but the config has "
                    f"decoder_head.type=m2f: set decoder_head.type=linear (or use the run's own config)")
    bare = tmp_path / "bare.pth"  # the weights alone, as in a released head file
    torch.save(torch.load(trained_head, weights_only=True)["model"], bare)
    line = error_of(capsys, ["export", *config[:2], f"head={bare}", *config[2:]])
    assert line == f"dinoseg: error: {bare}: this is a linear head but the config has decoder_head.type=m2f: " \
                   f"set decoder_head.type=linear"
    torch.save({"decoder.conv.weight": torch.zeros(4, 8, 1, 1)}, bare)
    line = error_of(capsys, ["export", *config[:2], f"head={bare}", *config[2:]])
    assert line == (f"dinoseg: error: {bare}: not a segmentation head (no linear or Mask2Former head keys; it holds 1 "
                    f"tensors: decoder.conv.weight)")


def test_a_missing_released_segmentor_names_the_command_line_key(tmp_path, capsys, monkeypatch):
    """Row 10 (segmentation side): `head=dinov3_vit7b16_ms` without the file said "pass weights=<path>"."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    line = error_of(capsys, ["export", *TINY, "head=dinov3_vit7b16_ms", "-o", str(tmp_path / "x.onnx")])
    assert "dinov3_vit7b16_ade20k_m2f_head" in line and "pass head=<path>" in line and "weights=" not in line


# -- ConvNeXt --------------------------------------------------------------------------------------------------

CONVNEXT = CONVNEXT_TINY  # a ConvNeXt-T with one block per stage, widths 8 to 32


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_convnext_linear_export_predicts_as_pytorch(tmp_path, capsys, mode):
    """Row 8: "the backbone side has no integer `patch_size`". A ConvNeXt has no patch grid: the graph takes any
    size (from 32 pixels) and its logits live on the first chosen stage's grid."""
    config = [*CONVNEXT, "decoder_head.backbone_out_layers=FOUR_EVEN_INTERVALS", "decoder_head.num_classes=6",
              f"eval.mode={mode}"]
    torch.manual_seed(0)
    model = build_model(load_config([], config), 6)
    with torch.no_grad():
        model.segmentation_model[1].conv.weight.normal_(0, 1.0)
    torch.save({"model": head_state_dict(model)}, tmp_path / "head.pth")
    config.append(f"head={tmp_path / 'head.pth'}")
    images = _images(tmp_path / "in", [(64, 64), (50, 90), (97, 61)])
    onnx_file = tmp_path / "convnext.onnx"
    assert main(["export", *config, "-o", str(onnx_file)]) == 0
    meta = OnnxSegmentor(onnx_file).metadata
    assert (meta["patch_size"], meta["size_multiple"], meta["input_size"]) == (None, 1, "dynamic")
    assert main(["predict", *config, "-i", str(images), "-o", str(tmp_path / "torch")]) == 0
    assert main(["predict", "--onnx", str(onnx_file), "-i", str(images), "-o", str(tmp_path / "onnx")]) == 0
    assert_same_outputs(tmp_path / "torch", tmp_path / "onnx")


def test_convnext_m2f_export_matches_pytorch(tmp_path):
    """Mask2Former on a ConvNeXt's stages: the pyramid pads the 48 x 48 crops to 64 inside the graph and crops each
    level back. (A fixed size keeps the suite fast: the dynamic export, verified at two sizes, takes about four
    times as long; `benchmarks/export_onnx.py` runs it.)"""
    torch.manual_seed(0)
    m2f = [item for item in M2F[len(TINY):] if ".adapter." not in item]  # a ConvNeXt has no adapter
    model = build_model(load_config([], [*CONVNEXT, *m2f]), 6).eval()
    with torch.no_grad():
        model.segmentation_model[1].predictor.class_embed.weight.mul_(20)
    metadata = deployment_metadata(**{**METADATA, "class_names": None, "palette": None})
    path = export_onnx(model, tmp_path / "m2f.onnx", image_size=(48, 48), metadata=metadata)
    onnx_model = OnnxSegmentor(path)
    assert (onnx_model.decoder, onnx_model.input_size, onnx_model.patch_size) == ("m2f", (48, 48), None)
    for batch, size in ((2, (48, 48)), (1, (40, 101))):
        x = torch.randn(batch, 3, 48, 48)
        assert_close(_class_scores(onnx_model.predict(x, rescale_to=size)), _class_scores(model.predict(x, rescale_to=size)))
