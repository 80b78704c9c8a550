"""ONNX export of detectors (`dinoseg export` of a detection run) and `predict --onnx` on the file, which picks the
detection task from its metadata and writes what PyTorch's `predict` writes."""

import contextlib
import io
import json

import pytest
import torch

from dinoseg.cli import main
from dinoseg.engine.checkpoint import LAST
from dinoseg.eval.detection.onnx_runtime import OnnxDetector
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
    assert (m["format"], m["task"], m["reparam"], m["input_size"], m["outputs"]) == (
        "dinoseg-detector/1", "detection", True, [64, 64], ["pred_logits", "pred_boxes"])  # transforms.eval.size
    assert (m["num_classes"], m["topk"], m["score_threshold"]) == (4, 100, 0.0)
    labels, names, colours = detector.categories()
    assert labels == {0: 1, 1: 3, 2: 5, 3: 7} and names[5] == "blue triangle"
    assert [colours[c] for c in (1, 3, 5, 7)] == category_colours(4)  # what predict draws with, from the file
    outputs = detector(torch.zeros(2, 3, 64, 64))  # the batch size is free
    assert outputs["pred_logits"].shape == (2, 10, 4) and outputs["pred_boxes"].shape == (2, 10, 4)
    with pytest.raises(ValueError, match="exported for 64x64 inputs, got 64x80"):
        detector(torch.zeros(1, 3, 64, 80))


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
