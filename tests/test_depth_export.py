"""ONNX export of depthers (`dinoseg export` of a depth run) and `predict --onnx` on the file, which picks the
depth task from its metadata; head files of the wrong task or head type, and the released heads' hint."""

import contextlib
import io

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dinoseg.cli import main
from dinoseg.engine.checkpoint import LAST
from dinoseg.eval.depth import run as depth_run_module
from dinoseg.eval.depth.export import ExportError, deployment_metadata, export_onnx
from dinoseg.eval.depth.models import build_depther
from dinoseg.eval.depth.onnx_runtime import OnnxDepther
from dinoseg.eval.depth.run import depth_to_png16
from dinoseg.eval.segmentation.config import load_config
from dinoseg.eval.segmentation.setup import build_model
from dinoseg.models.frozen import head_state_dict
from dinoseg.models.vision_transformer import DinoVisionTransformer

from ._depth_run import tiny_depth
from .engine_utils import TINY
from .test_run_safety import error_of, snapshot

TINY_VIT = dict(patch_size=16, embed_dim=32, depth=4, num_heads=2, n_storage_tokens=4, layerscale_init=1e-5,
                mask_k_bias=True, pos_embed_rope_dtype="fp32")


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory):
    """A finished 4-iteration linear depth run (flip TTA on, as `predict` uses it), exported through the command
    line: (run directory, ONNX file, what the export printed, whether the run stayed byte-identical)."""
    out = tmp_path_factory.mktemp("depth") / "run"
    assert main(["train", *tiny_depth(out, total_iter=4, checkpoint_interval=4)]) == 0
    onnx_file = tmp_path_factory.mktemp("deploy") / "depther.onnx"
    before, printed = snapshot(out), io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["export", str(out / "depth_config.yaml"), f"head={out / LAST}", "-o", str(onnx_file)])
    assert code == 0
    return out, onnx_file, printed.getvalue(), snapshot(out) == before


def test_export_of_a_depth_run_writes_the_file_and_says_so(depth_run):
    # Issue 20, row 1: this exited 0 without a word or a file (export was segmentation's only).
    run, onnx_file, printed, untouched = depth_run
    assert f"wrote {onnx_file}" in printed and onnx_file.is_file()
    assert untouched  # exporting reads the run, never writes into it
    m = OnnxDepther(onnx_file).metadata
    assert (m["format"], m["task"], m["head"], m["input_size"], m["outputs"]) == (
        "dinoseg-depther/1", "depth", "LinearHead", "dynamic", ["depth"])
    assert m["flip"] is True and m["img_size"] is None and (m["min_depth"], m["max_depth"]) == (0.001, 10.0)


def _images(folder, sizes):
    folder.mkdir()
    gen = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(gen.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_predict_onnx_writes_the_same_depth_pngs_as_predict(depth_run, tmp_path, monkeypatch):
    """Nothing but the file: `predict --onnx` tells the task from the metadata and writes the PNGs PyTorch's
    `predict` writes (sizes that the graph pads to the patch size inside included). Two runtimes agree to float32
    rounding (here within 1e-6 m), not bit for bit: a millimetre PNG can then differ by 1 mm where the depth lies
    on a half-millimetre boundary (4 of 13,000 pixels here), and nowhere else."""
    run, onnx_file, _, _ = depth_run
    images = _images(tmp_path / "in", [(64, 64), (50, 90), (97, 61)])
    config = [str(run / "depth_config.yaml"), f"head={run / LAST}"]
    metres = []  # the float depth maps behind the PNGs, in the order written
    monkeypatch.setattr(depth_run_module, "depth_to_png16", lambda d: (metres.append(d), depth_to_png16(d))[1])
    assert main(["predict", *config, "-i", str(images), "-o", str(tmp_path / "torch")]) == 0
    assert main(["predict", "--onnx", str(onnx_file), "-i", str(images), "-o", str(tmp_path / "onnx")]) == 0
    names = sorted(p.name for p in (tmp_path / "torch").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "onnx").glob("*.png")) and len(names) == 6
    for i, name in enumerate(sorted({n.rsplit("_", 1)[0] for n in names})):
        ref_m, ours_m = metres[i].double(), metres[i + 3].double()
        assert (ours_m - ref_m).abs().max().item() < 1e-5
        ours, ref = (np.array(Image.open(tmp_path / d / f"{name}_depth.png")).astype(np.int64) for d in ("onnx", "torch"))
        assert Image.open(tmp_path / "onnx" / f"{name}_depth.png").mode == "I;16"
        differ = ours != ref
        assert np.abs(ours - ref).max() <= 1 and differ.mean() < 1e-3, name
        on_boundary = ((ref_m * 1000) % 1 - 0.5).abs().numpy() < 0.01  # within 10 µm of x.5 mm
        assert not (differ & ~on_boundary).any(), name
        assert np.array_equal(np.array(Image.open(tmp_path / "onnx" / f"{name}_color.png")),
                              np.array(Image.open(tmp_path / "torch" / f"{name}_color.png"))), name


@pytest.fixture(scope="module")
def dpt(tmp_path_factory):
    torch.manual_seed(0)
    depther = build_depther(DinoVisionTransformer(**TINY_VIT), "FOUR_EVEN_INTERVALS", 16, head_type="dpt",
                            use_batchnorm=True, max_depth=20.0, channels=16, post_process_channels=[8, 8, 8, 8])
    path = export_onnx(depther, tmp_path_factory.mktemp("dpt") / "dpt.onnx",
                       metadata=deployment_metadata(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), img_size=64, flip=True))
    return depther, path


def test_dpt_export_matches_pytorch_at_any_size(dpt):
    depther, path = dpt
    onnx_depther = OnnxDepther(path, threads=1)
    assert onnx_depther.metadata["head"] == "DPTHead" and onnx_depther.metadata["max_depth"] == 20.0
    for shape in ((2, 3, 64, 96), (1, 3, 75, 45), (1, 3, 40, 130)):  # centre padding to 16 inside the graph
        x = torch.randn(shape)
        with torch.no_grad():
            ref = depther(x)
        ours = onnx_depther(x)
        assert ours.shape == ref.shape and (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    raw = torch.randint(0, 256, (3, 40, 90), dtype=torch.uint8)
    (image,), _ = onnx_depther.eval_transforms()(raw, torch.zeros(1, 40, 90))
    assert image.shape == (3, 64, 144)


def test_depth_export_refusals(tmp_path):
    depther = build_depther(DinoVisionTransformer(**TINY_VIT), "LAST", 4, head_type="linear")
    with pytest.raises(ExportError, match=r"image_size \[48, 48\]: a fixed-size graph must take the images the "
                                          r"preprocessing gives; set img_size \(transforms.eval.img_size\) to \[48, 48\]"):
        export_onnx(depther, tmp_path / "x.onnx", image_size=(48, 48))
    with pytest.raises(ExportError, match="expected a Depther"):
        export_onnx(torch.nn.Conv2d(3, 1, 1), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_heads_of_another_task_or_head_type_are_named(depth_run, tmp_path, capsys):
    """Issue 20, row 11: a depth head on a segmentation config said "cannot infer num_classes"."""
    run = depth_run[0]
    head = run / LAST
    images = str(_images(tmp_path / "in", [(32, 32)]))
    seg = [*TINY, f"output_dir={tmp_path / 'seg'}"]
    line = error_of(capsys, ["predict", *seg, f"head={head}", "-i", images, "-o", str(tmp_path / "o")])
    assert line == (f"dinoseg: error: {head}: this is a depth head (decoder_head.type=linear), not a segmentation "
                    f"head: use it with a depth config (task=depth)")
    # The converse: a segmentation checkpoint (head + the run's config) given to a depth config.
    cfg = load_config([], [*TINY, "decoder_head.type=linear"])
    seg_head = tmp_path / "seg.pth"
    torch.save({"model": head_state_dict(build_model(cfg, 6)), "config": OmegaConf.to_yaml(cfg)}, seg_head)
    config = str(run / "depth_config.yaml")
    line = error_of(capsys, ["predict", config, f"head={seg_head}", "-i", images, "-o", str(tmp_path / "o")])
    assert f"{seg_head}: this is a segmentation head (decoder_head.type=linear), not a depth head" in line
    # A head of the other head type of the same task.
    line = error_of(capsys, ["export", config, f"head={head}", "decoder_head.type=dpt", "-o", str(tmp_path / "d.onnx")])
    assert line == (f"dinoseg: error: {head}: this is a linear depth head but the config has decoder_head.type=dpt: "
                    f"set decoder_head.type=linear (or use the run's own config)")
    assert not (tmp_path / "o").exists() and not (tmp_path / "d.onnx").exists()


def test_a_missing_released_head_names_the_command_line_key(depth_run, tmp_path, capsys, monkeypatch):
    """Issue 20, row 10: the 7B depther without its head file said "pass weights=<path>"; the key is `head=`."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    run = depth_run[0]
    line = error_of(capsys, ["eval", str(run / "depth_config.yaml"), "head=dinov3_vit7b16_dd",
                             f"output_dir={tmp_path / 'e'}"])
    assert "dinov3_vit7b16_synthmix_dpt_head-02040be1.pth" in line and "pass head=<path>" in line
    assert "weights=" not in line
