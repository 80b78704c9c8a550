"""ONNX export of detectors (`dinoseg export` of a detection run) and `predict --onnx` on the file, which picks the
detection task from its metadata and writes what PyTorch's `predict` writes; images of another aspect ratio than
the graph's are padded onto it with the padding mask, and give what the PyTorch detector gives on that padded
batch."""

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dinoseg.cli import load, main
from dinoseg.engine.checkpoint import LAST
from dinoseg.eval.detection.models.detr import PostProcess
from dinoseg.eval.detection.onnx_runtime import OnnxDetector
from dinoseg.eval.detection.run import load_detector
from dinoseg.eval.detection.transforms import fitted_size
from dinoseg.eval.detection.util.misc import NestedTensor
from dinoseg.eval.detection.visualization import category_colours

from ._detection_run import tiny_detection, write_coco_folders
from .test_run_safety import error_of, snapshot

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 4-iteration run of the reparameterised detector (the released kind: boxes in pixels), exported through the
    command line: (run, COCO folder, ONNX file, what the export printed, whether the run stayed byte-identical)."""
    root = tmp_path_factory.mktemp("coco")
    data = write_coco_folders(root, train=8, val=3)
    out = root / "run"
    assert main(["train", *tiny_detection(data, out, total_iter=4, checkpoint_interval=4,
                                          extra=["decoder_head.reparam=true", "optimizer.lr=2e-3"])]) == 0
    onnx_file = tmp_path_factory.mktemp("deploy") / "detector.onnx"
    before, printed = snapshot(out), io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["export", str(out / "detection_config.yaml"), f"head={out / LAST}", "-o", str(onnx_file)])
    assert code == 0
    return out, root, onnx_file, printed.getvalue(), snapshot(out) == before


def test_export_writes_a_fixed_size_graph_with_the_categories(exported):
    run, _, onnx_file, printed, untouched = exported
    assert f"wrote {onnx_file}" in printed and onnx_file.is_file()
    assert untouched  # exporting reads the run, never writes into it
    detector = OnnxDetector(onnx_file)
    m = detector.metadata
    assert (m["format"], m["task"], m["reparam"], m["input_size"], m["inputs"], m["outputs"]) == (
        "dinoseg-detector/2", "detection", True, [64, 64], ["image", "mask"], ["pred_logits", "pred_boxes"])
    # the canvas: transforms.eval.max_size (null here), else transforms.eval.size, square; and the resize rule
    assert (m["eval_size"], m["eval_max_size"]) == (64, None)
    assert (m["num_classes"], m["topk"], m["score_threshold"]) == (4, 100, 0.0)
    labels, names, colours = detector.categories()
    assert labels == {0: 1, 1: 3, 2: 5, 3: 7} and names[5] == "blue triangle"
    assert [colours[c] for c in (1, 3, 5, 7)] == category_colours(4)  # what predict draws with, from the file
    outputs = detector(torch.zeros(2, 3, 64, 64))  # the batch size is free
    assert outputs["pred_logits"].shape == (2, 10, 4) and outputs["pred_boxes"].shape == (2, 10, 4)


def test_wrong_inputs_are_one_line(exported, tmp_path, capsys):
    _, root, onnx_file, _, _ = exported
    detector = OnnxDetector(onnx_file)
    for bad, message in [
        (torch.zeros(1, 3, 64, 80), re.escape("exported for 64x64 inputs (smaller ones are padded), got 64x80: resize it")),
        ([torch.zeros(3, 72, 32)], re.escape("exported for 64x64 inputs (smaller ones are padded), got 72x32")),
        (torch.zeros(1, 1, 64, 64), r"expected images \[B, 3, H, W\], got shape \[1, 1, 64, 64\]"),
        (NestedTensor(torch.zeros(2, 3, 48, 64), torch.zeros(2, 64, 48, dtype=torch.bool)),
         r"the padding mask must be bool \[B, H, W\] = \[2, 48, 64\], got torch.bool \[2, 64, 48\]"),
        ("image.png", "expected a list of .3, H, W. images, a .B, 3, H, W. tensor or a NestedTensor, not str"),
    ]:
        with pytest.raises(ValueError, match=message) as caught:
            detector(bad)
        assert "\n" not in str(caught.value)
    # A file of the first format (no mask input, images stretched to its size) is refused in one line.
    import onnx

    model = onnx.load(str(onnx_file))
    next(p for p in model.metadata_props if p.key == "format").value = '"dinoseg-detector/1"'
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    line = error_of(capsys, ["predict", "--onnx", str(old), "-i", str(root / "val" / "images"), "-o", str(tmp_path / "out")])
    assert f"{old}: exported by an older dinoseg (metadata format 'dinoseg-detector/1'; this version runs " \
           "'dinoseg-detector/2'): export it again" in line
    assert not (tmp_path / "out").exists()


def test_fitted_size_keeps_the_aspect_ratio():
    """The eval transform's size (short side, long side at most max_size), scaled down only where it does not fit."""
    assert fitted_size(48, 80, 64, None, (64, 64)) == (38, 64)  # 64 x 106 does not fit: the width limits
    assert fitted_size(80, 48, 64, None, (64, 64)) == (64, 38)
    assert fitted_size(600, 800, 800, 1333, (1344, 1344)) == (800, 1066)  # fits: exactly PyTorch's eval size
    assert fitted_size(100, 1000, 800, 1333, (1344, 1344)) == (133, 1330)  # max_size limits, fits
    assert fitted_size(100, 1000, 800, 1333, (800, 800)) == (80, 800)
    assert fitted_size(32, 32, 64, None, (64, 96)) == (64, 64)


def test_a_non_square_image_is_padded_and_masked(exported, tmp_path):
    """An 80x48 image keeps its aspect ratio: resized to 64x38 (W x H), in the top-left of the 64x64 canvas, the
    mask True on the rest; `predict --onnx` gives what the PyTorch detector gives on that padded, masked batch, the
    boxes in the original image's pixels."""
    run, _, onnx_file, _, _ = exported
    rng = np.random.default_rng(0)
    pixels = np.full((48, 80, 3), 40, np.uint8)
    pixels[8:30, 10:44] = (220, 60, 60)  # a red rectangle, as in the training images
    pixels[20:44, 50:74] = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "wide.png")

    detector = OnnxDetector(onnx_file)
    raw = torch.from_numpy(pixels).permute(2, 0, 1)
    image, target = detector.eval_transforms()(raw, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})
    assert image.shape == (3, 38, 64) and target["size"].tolist() == [38, 64]
    batch = detector.canvas_batch([image])
    assert batch.tensors.shape == (1, 3, 64, 64) and batch.mask.shape == (1, 64, 64)
    assert torch.equal(batch.tensors[0, :, :38], image) and not batch.tensors[0, :, 38:].any()
    assert not batch.mask[0, :38].any() and batch.mask[0, 38:].all()

    assert main(["predict", "--onnx", str(onnx_file), "-i", str(folder), "-o", str(tmp_path / "onnx")]) == 0
    record = json.loads((tmp_path / "onnx" / "wide.json").read_text())
    assert (record["width"], record["height"]) == (80, 48)

    # The reference: the PyTorch detector on the same padded batch, built by hand.
    from torchvision.transforms.v2 import functional as F

    _, cfg = load([str(run / "detection_config.yaml"), f"head={run / LAST}"], "predict")
    model = load_detector(cfg, torch.device("cpu"))
    resized = F.resize(raw, [38, 64], antialias=True).float() / 255
    resized = F.normalize(resized, list(cfg.transforms.mean), list(cfg.transforms.std))
    x = torch.zeros(1, 3, 64, 64)
    x[0, :, :38] = resized
    mask = torch.ones(1, 64, 64, dtype=torch.bool)
    mask[0, :38] = False
    with torch.no_grad():
        outputs = model(NestedTensor(x, mask))
    found = PostProcess(cfg.decoder_head.topk, reparam=True)(outputs, torch.tensor([[38, 64]]))[0]
    boxes = found["boxes"].double() * torch.tensor([80 / 64, 48 / 38, 80 / 64, 48 / 38], dtype=torch.float64)
    labels = {0: 1, 1: 3, 2: 5, 3: 7}
    assert len(record["detections"]) == len(found["scores"]) == 40
    for det, score, label, box in zip(record["detections"], found["scores"].tolist(), found["labels"].tolist(),
                                      boxes.tolist()):
        assert det["category_id"] == labels[label]
        assert det["score"] == pytest.approx(score, abs=1e-5)
        assert det["box"] == pytest.approx(box, abs=1e-3)
        assert 0 <= det["box"][0] <= det["box"][2] <= 80 and 0 <= det["box"][1] <= det["box"][3] <= 48
    # Not what the detector gives on the image stretched to the canvas (what the first format did).
    stretched = F.normalize(F.resize(raw, [64, 64], antialias=True).float() / 255, list(cfg.transforms.mean),
                            list(cfg.transforms.std))
    with torch.no_grad():
        other = model(stretched[None])
    assert not torch.allclose(other["pred_logits"], outputs["pred_logits"], atol=1e-3)


def test_predict_onnx_writes_the_detections_of_predict(exported, tmp_path):
    """Nothing but the file: `predict --onnx` tells the task from the metadata and writes the boxes, scores and
    categories PyTorch's `predict` writes (to float32 rounding)."""
    run, root, onnx_file, _, _ = exported
    images = root / "val" / "images"
    assert main(["predict", str(run / "detection_config.yaml"), f"head={run / LAST}", "-i", str(images), "-o",
                 str(tmp_path / "torch")]) == 0
    assert main(["predict", "--onnx", str(onnx_file), "-i", str(images), "-o", str(tmp_path / "onnx")]) == 0
    names = sorted(p.name for p in (tmp_path / "torch").iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in (tmp_path / "onnx").iterdir() if not p.name.startswith(".")) and len(names) == 6
    for name in (n for n in names if n.endswith(".json")):
        a, b = (json.loads((tmp_path / kind / name).read_text()) for kind in ("torch", "onnx"))
        assert len(a["detections"]) == len(b["detections"]) == 40  # 10 queries x 4 classes, threshold 0
        for x, y in zip(a["detections"], b["detections"]):
            assert (x["category_id"], x["category_name"]) == (y["category_id"], y["category_name"])
            assert x["score"] == pytest.approx(y["score"], abs=1e-5)
            assert x["box"] == pytest.approx(y["box"], abs=1e-3)


def test_export_refusals_are_one_line(exported, tmp_path, capsys):
    run, _, _, _, _ = exported
    config = [str(run / "detection_config.yaml"), f"head={run / LAST}"]
    line = error_of(capsys, ["export", *config, "-o", str(tmp_path / "a.onnx"), "--size", "32", "32"])
    assert "--size=32: a 2 x 2 feature map is too small for proposals at stride 64" in line
    line = error_of(capsys, ["export", *config, "-o", str(tmp_path / "a.onnx"), "--size", "72", "72"])
    assert "image size [72, 72]: expected [H, W], multiples of the patch size 16" in line
    line = error_of(capsys, ["export", *config, "-o", str(tmp_path / "a.txt")])
    assert "the exported file must end in .onnx" in line
    bare = tmp_path / "segmentation_head.pth"
    torch.save({"segmentation_model.1.conv.weight": torch.zeros(4, 8, 1, 1)}, bare)
    line = error_of(capsys, ["export", config[0], f"head={bare}", "-o", str(tmp_path / "a.onnx")])
    assert f"{bare}: not a detector head checkpoint" in line
    assert not any(tmp_path.glob("*.onnx"))
