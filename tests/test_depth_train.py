"""The depth task through the command line: train -> eval -> predict, exact resume, checkpoint_best by a metric's
direction, the run directory and resume contract, one-line errors, check-data, and the demo."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dinoseg.cli import main
from dinoseg.engine.checkpoint import BEST, LAST

from ._depth_run import tiny_depth
from .engine_utils import assert_same_head, kill_and_resume, read_checkpoint


def error_of(capsys, args, code=2) -> str:
    got = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "dinoseg: error:" in line or "Traceback" in line]
    assert got == code, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("dinoseg: error: "), err[-2000:]
    return lines[0]


def snapshot(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory):
    """A finished 40-iteration depth run: validation and checkpoints at 20 and 40."""
    out = tmp_path_factory.mktemp("depth") / "run"
    assert main(["train", *tiny_depth(out, total_iter=40, eval_interval=20, checkpoint_interval=20)]) == 0
    return out


def test_train_writes_the_run(depth_run):
    out = depth_run
    for name in ("depth_config.yaml", LAST, BEST, "metrics.jsonl", "results-depth.csv", "results-depth.json",
                 "model_final.pth"):
        assert (out / name).exists(), name
    ckpt = read_checkpoint(out / LAST)
    assert ckpt["iteration"] == 40
    # Head only, official Depther keys: the frozen backbone (encoder.backbone.*) is never written.
    assert set(ckpt["model"]) == {f"decoder.{k}" for k in (
        "batchnorm_layer.weight", "batchnorm_layer.bias", "batchnorm_layer.running_mean", "batchnorm_layer.running_var",
        "batchnorm_layer.num_batches_tracked", "conv_depth.weight", "conv_depth.bias")}
    # model_final.pth: the official trainer's layout (decoder keys without prefix), what official code loads.
    final = read_checkpoint(out / "model_final.pth")
    assert set(final["model"]) == {k.removeprefix("decoder.") for k in ckpt["model"]}
    assert all(torch.equal(final["model"][k.removeprefix("decoder.")], v) for k, v in ckpt["model"].items())
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if "val" in r] == [20, 40]
    assert set(log[-1]["val"]) == {"rmse", "abs_rel", "a1"}
    # The official CSV: one row, columns <dataset>_<metric>.
    header, row = (out / "results-depth.csv").read_text().splitlines()
    assert header == "SyntheticDepth_rmse,SyntheticDepth_abs_rel,SyntheticDepth_a1" and len(row.split(",")) == 3
    results = json.loads((out / "results-depth.json").read_text())
    assert results["num_samples"] == 6 and results["per_image"]["name"][0] == "val_000000"
    assert results["rmse"] == pytest.approx(np.mean(results["per_image"]["rmse"]), rel=1e-5)  # per image, then the mean


def test_eval_reproduces_the_final_evaluation_beside_the_run(depth_run, capsys):
    out = depth_run
    before = {p: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["eval", str(out / "depth_config.yaml"), f"head={out / LAST}"]) == 0
    assert {p: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    trained = json.loads((out / "results-depth.json").read_text())
    evaluated = json.loads((out / "eval" / "checkpoint_last" / "results-depth.json").read_text())
    assert evaluated == trained
    assert "rmse" in capsys.readouterr().out
    # The official trainer's file gives the same head.
    assert main(["eval", str(out / "depth_config.yaml"), f"head={out / 'model_final.pth'}"]) == 0
    assert json.loads((out / "eval" / "model_final" / "results-depth.json").read_text()) == trained
    # Visualisations (official result_config) go to the eval folder too.
    assert main(["eval", str(out / "depth_config.yaml"), f"head={out / BEST}", "result_config.save_results=true",
                 "result_config.extension=png", "eval.use_tta=false"]) == 0
    assert len(list((out / "eval" / "checkpoint_best" / "visualizations").glob("results_*.png"))) == 6


def test_predict_writes_16_bit_millimetres_and_colour_maps(depth_run, tmp_path):
    from omegaconf import OmegaConf

    from dinoseg.eval.depth.config import load_config
    from dinoseg.eval.depth.run import load_depther

    out = depth_run
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (70, 45), (200, 30, 30)).save(images / "a.png")
    Image.new("L", (33, 90), 128).save(images / "b.jpg")
    pred = tmp_path / "pred"
    assert main(["predict", str(out / "depth_config.yaml"), f"head={out / LAST}", "eval.use_tta=false",
                 "-i", str(images), "-o", str(pred)]) == 0
    depth = Image.open(pred / "a_depth.png")
    assert depth.mode == "I;16" and depth.size == (70, 45)
    assert Image.open(pred / "a_color.png").mode == "RGB" and Image.open(pred / "b_depth.png").size == (33, 90)
    # The values are the depther's prediction at the image size, in millimetres.
    cfg = load_config([str(out / "depth_config.yaml")], [f"head={out / LAST}"])
    model = load_depther(cfg, torch.device("cpu"))
    from dinoseg.eval.depth.transforms import make_depth_eval_transforms

    t = OmegaConf.to_container(cfg.transforms)
    (x,), _ = make_depth_eval_transforms(mean=t["mean"], std=t["std"])(np.array(Image.open(images / "a.png")),
                                                                     np.zeros((45, 70)))
    with torch.no_grad():
        metres = torch.nn.functional.interpolate(model(x[None]), size=(45, 70), mode="bilinear")[0, 0]
    mm = np.asarray(depth).astype(np.int64)
    assert np.abs(mm - (metres.double() * 1000).round().numpy()).max() <= 1
    assert 1 <= mm.min() and mm.max() <= 10_000  # within the head's 0.001-10 m
    # With TTA the map changes (mean with the flipped prediction), the files stay where they are.
    assert main(["predict", str(out / "depth_config.yaml"), f"head={out / LAST}", "-i", str(images / "a.png"),
                 "-o", str(tmp_path / "tta")]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "tta" / "a_depth.png")), np.asarray(depth))


def test_predict_skips_unreadable_images_and_never_reads_its_outputs(depth_run, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(images / "good.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    args = ["predict", str(depth_run / "depth_config.yaml"), f"head={depth_run / LAST}", "-i", str(images), "-o", str(images)]
    line = error_of(capsys, args)
    assert "1 of 2 images could not be read" in line and str(images / "broken.jpg") in line
    (images / "broken.jpg").unlink()
    assert main(args) == 0  # -o equal to -i: its own outputs are not inputs
    assert "wrote 2 files for 1 images" in capsys.readouterr().out
    assert sorted(p.name for p in images.glob("*.png")) == ["good.png", "good_color.png", "good_depth.png"]


def test_checkpoint_best_follows_the_metric_direction(tmp_path):
    for metric, pick in (("rmse", min), ("a1", max)):
        out = tmp_path / metric
        assert main(["train", *tiny_depth(out, total_iter=40, eval_interval=10, checkpoint_interval=40),
                     f"eval.metric_to_save={metric}"]) == 0
        log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        values = {r["iteration"]: r["val"][metric] for r in log if "val" in r}
        assert len(set(values.values())) > 1  # the choice matters
        best = read_checkpoint(out / BEST)
        assert best["best"][metric] == pick(values.values())
        assert best["iteration"] == best["best"]["iteration"] == pick(values, key=values.get)


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_head(tmp_path):
    total = 60

    def args(out):
        return ["train", *tiny_depth(out, total_iter=total, eval_interval=30, checkpoint_interval=10,
                                     extra=["eval.max_val_samples=2"])]

    a, b = kill_and_resume(args, tmp_path, total)
    assert_same_head(a, b, total)
    assert a["optimizer"]["param_groups"][0]["betas"] == b["optimizer"]["param_groups"][0]["betas"]


def test_ctrl_c_then_resume_across_the_sigloss_warm_up_is_exact(tmp_path, monkeypatch, capsys):
    """SigLoss uses its mean term only for its first 100 calls; a run resumed at iteration 60 must not start that
    warm-up again. Ctrl-C is raised in the loop at iteration 70, after the checkpoint of iteration 60."""
    from dinoseg.eval.depth import train as depth_train

    total = 120

    def args(out, *extra):
        return ["train", *tiny_depth(out, total_iter=total, eval_interval=total, checkpoint_interval=20,
                                     extra=["eval.max_val_samples=2", *extra])]

    assert main(args(tmp_path / "ref")) == 0
    real, calls = depth_train.depth_loss, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 71:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(depth_train, "depth_loss", interrupted)
    out = tmp_path / "cut"
    line = error_of(capsys, args(out), code=130)
    assert f"interrupted at iteration 70 of {total}; last checkpoint: {out / LAST} (iteration 60)" in line
    monkeypatch.setattr(depth_train, "depth_loss", real)
    assert main(args(out, "train.resume=true")) == 0
    a, b = read_checkpoint(tmp_path / "ref" / LAST), read_checkpoint(out / LAST)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_run_directory_and_resume_contract(depth_run, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    shutil.copytree(depth_run, run)
    config = (run / "depth_config.yaml").read_text().replace(str(depth_run), str(run))
    (run / "depth_config.yaml").write_text(config)

    def train(*extra, total=40):
        return ["train", *tiny_depth(run, total_iter=total, eval_interval=20, checkpoint_interval=20), *extra]

    before = snapshot(run)
    for mistake, message in (
        ([], "already holds a run (checkpoint_last.pth at iteration 40)"),
        (["train.resume=true", "losses.SIGLOSS=0.5"], "losses.SIGLOSS: 1.0 in the checkpoint, 0.5 now"),
        (["train.resume=true", "decoder_head.n_output_channels=8"], "decoder_head.n_output_channels: 16 in the checkpoint"),
        (["train.resume=true", "eval.metric_to_save=a1"], "eval.metric_to_save: 'rmse' in the checkpoint, 'a1' now"),
        (["train.resume=true", "scheduler.use_beta1=false"], "scheduler.use_beta1: True in the checkpoint, False now"),
    ):
        assert message in error_of(capsys, train(*mistake))
        assert snapshot(run) == before  # byte-identical
    # Bookkeeping may change on resume (the run is extended to 60 iterations, the visualisations switched on).
    import logging

    caplog.set_level(logging.INFO, logger="dinoseg")
    assert main(train("train.resume=true", "result_config.save_results=true", total=60)) == 0
    assert read_checkpoint(run / LAST)["iteration"] == 60 and (run / "visualizations").is_dir()
    assert "changed: result_config.save_results: False -> True" in caplog.text
    # overwrite: the run's own files go (model_final.pth, visualizations, eval/ included), the user's stay.
    (run / "notes.txt").write_text("mine")
    assert main(train("overwrite_output_dir=true", total=20)) == 0
    assert (run / "notes.txt").read_text() == "mine" and not (run / "visualizations").exists()
    assert read_checkpoint(run / "model_final.pth")["iteration"] == 20


def test_bad_depth_inputs_give_one_line_errors(depth_run, tmp_path, capsys, monkeypatch):
    base = tiny_depth(tmp_path / "r", total_iter=4)
    for extra, message in (
        (["datasets.train=Synthetic:split=TRAIN:num_samples=8"], "datasets.train='Synthetic:split=TRAIN:num_samples=8': "
                                                                 "SyntheticShapes is not a depth dataset"),
        (["transforms.normalization_constant=256"], "transforms.normalization_constant=256.0: SyntheticDepth "
                                                    "(datasets.train) stores 1000 units per metre"),
        (["datasets.val=NYU:split=VAL:root=/nonexistent/nyu"], "NYU: root folder not found: /nonexistent/nyu"),
        (["decoder_head.backbone_out_layers=[7]"], "decoder_head: backbone_out_layers [7] must be block indices in [0, 3]"),
        (["decoder_head.type=dpt", "decoder_head.head_kwargs.post_process_channels=[8,8]"],
         "decoder_head: DPTHead: post_process_channels needs 4 entries"),
    ):
        assert message in error_of(capsys, ["train", *base, *extra])
        assert not (tmp_path / "r").exists()
    config = str(depth_run / "depth_config.yaml")
    eval_out = f"output_dir={tmp_path / 'e'}"
    assert "head: a head checkpoint is required" in error_of(capsys, ["eval", config, "head=null", eval_out])
    assert "head checkpoint not found" in error_of(capsys, ["eval", config, f"head={tmp_path / 'no.pth'}", eval_out])
    line = error_of(capsys, ["eval", config, f"head={depth_run / LAST}", "decoder_head.type=dpt", eval_out])
    assert f"{depth_run / LAST}: this is a linear depth head but the config has decoder_head.type=dpt" in line
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    line = error_of(capsys, ["eval", config, "head=dinov3_vit7b16_dd", eval_out])
    assert "dinov3_vit7b16_synthmix_dpt_head-02040be1.pth" in line and "never downloads" in line


def test_images_of_different_sizes_need_a_crop_and_bfloat16_trains_on_cpu(tmp_path, capsys):
    root = tmp_path / "folder"
    for i, (h, w) in enumerate([(40, 48), (48, 40), (40, 40), (48, 48)]):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "depths").mkdir(exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 60 * i, np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(np.full((h, w), 1000 + 500 * i, np.uint16)).save(root / "depths" / f"{i}.png")
    data = [f"datasets.train=DepthFolder:root={root}", f"datasets.val=DepthFolder:root={root}", "train.num_workers=1"]
    line = error_of(capsys, ["train", *tiny_depth(tmp_path / "r", total_iter=4), *data])
    assert "training samples of different sizes cannot form a batch: set transforms.train.random_crop" in line
    out = tmp_path / "bf16"
    assert main(["train", *tiny_depth(out, total_iter=3, checkpoint_interval=3), *data,
                 "transforms.train.random_crop=[32,32]", "precision=bfloat16"]) == 0
    ckpt = read_checkpoint(out / LAST)
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["model"].values())  # master weights stay fp32
    assert json.loads((out / "results-depth.json").read_text())["num_samples"] == 4


def test_check_data_on_a_depth_config(tmp_path, capsys):
    from .test_depth_datasets import make_nyu

    make_nyu(tmp_path)
    args = ["check-data", "nyu_linear.yaml", f"datasets.root={tmp_path}"]
    assert main(args + ["--split", "val"]) == 0  # no weights needed
    out = capsys.readouterr().out
    assert "No problems found." in out and "depth_scale 1000 per metre" in out
    assert main(args + ["transforms.normalization_constant=256", "--split", "val"]) == 1
    assert "stores 1000 units per metre: depths would be off by a factor 0.256" in capsys.readouterr().out
    (tmp_path / "test_scene_0" / "sync_depth_00000.png").write_bytes(b"broken")
    assert main(args + ["--split", "val"]) == 1
    assert "unreadable or corrupt depth map" in capsys.readouterr().out


def _depth_folder(root, depth: np.ndarray, n: int = 4):
    """A DepthFolder of `n` 32 x 32 images, each with the depth map `depth` (its dtype decides the PNG's bit depth)."""
    (root / "images").mkdir(parents=True)
    (root / "depths").mkdir()
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(depth).save(root / "depths" / f"{i}.png")
    return [f"datasets.train=DepthFolder:root={root}", f"datasets.val=DepthFolder:root={root}",
            "transforms.train.random_crop=[32,32]"]


def test_depth_units_that_look_wrong_stop_training_before_the_first_step(depth_run, tmp_path, capsys):
    """8-bit maps read as millimetres (a visualisation saved as depth: 0.025-0.2 m) and metres read as millimetres:
    check-data's unit checks run on a sample of the training maps, and the line names the file and the overrides."""
    fix = ("add depth_scale=N (its stored units per metre) to datasets.train and set transforms.normalization_constant=N, "
           "or set datasets.check_units=false to train on these depths as they are")
    eight_bit = _depth_folder(tmp_path / "eight_bit", np.full((32, 32), 100, np.uint8))
    metres = _depth_folder(tmp_path / "metres", np.full((32, 32), 3, np.uint16))
    for data, fault in (
        (eight_bit, f"{tmp_path / 'eight_bit' / 'depths' / '0.png'}: depth units look wrong: an 8-bit depth map with "
                    "depth_scale=1000 stored units per metre holds no depth beyond 0.255 m (median 0.1 m; a "
                    "visualisation saved as depth?)"),
        (metres, f"{tmp_path / 'metres' / 'depths' / '0.png'}: depth units look wrong: median valid depth 0.003 m "
                 "with depth_scale=1000 stored units per metre"),
    ):
        out = tmp_path / "fresh"
        assert error_of(capsys, ["train", *tiny_depth(out, total_iter=4), *data]) == f"dinoseg: error: {fault}: {fix}"
        assert not out.exists()
    # An existing run stays byte-identical, overwrite or not.
    run = tmp_path / "run"
    shutil.copytree(depth_run, run)
    before = snapshot(run)
    assert "depth units look wrong" in error_of(capsys, ["train", *tiny_depth(run, total_iter=4), *eight_bit,
                                                         "overwrite_output_dir=true"])
    assert snapshot(run) == before
    # check-data counts them as problems (exit 1), as warnings with datasets.check_units=false (exit 0) ...
    assert main(["check-data", "demo_depth.yaml", eight_bit[0]]) == 1
    assert "4 problem(s):" in capsys.readouterr().out
    assert main(["check-data", "demo_depth.yaml", eight_bit[0], "datasets.check_units=false"]) == 0
    assert "No problems found." in capsys.readouterr().out
    # ... which also trains on them as they are.
    out = tmp_path / "as_they_are"
    assert main(["train", *tiny_depth(out, total_iter=4, checkpoint_interval=4), *eight_bit,
                 "datasets.check_units=false"]) == 0
    assert read_checkpoint(out / LAST)["iteration"] == 4


def test_demo_beats_the_mean_depth(tmp_path, capsys):
    """A fast variant of `dinoseg demo demo_depth.yaml` (64 px, 200 iterations): the trained head is far better than
    predicting the training set's mean depth (measured: RMSE 1.05 vs 2.71 m, AbsRel 0.23 vs 0.96, a1 0.63 vs 0.10)."""
    from dinoseg.eval.depth.config import load_config
    from dinoseg.eval.depth.run import run_demo

    out = tmp_path / "demo"
    cfg = load_config(["demo_depth.yaml"], [
        f"output_dir={out}", "scheduler.total_iter=200", "eval.eval_interval=100", "train.checkpoint_interval=100",
        "datasets.train=SyntheticDepth:split=TRAIN:num_samples=128:image_size=64",
        "datasets.val=SyntheticDepth:split=VAL:num_samples=16:image_size=64", "transforms.train.random_crop=[64,64]"])
    results = run_demo(cfg)
    baseline = results["baseline"]
    assert results["rmse"] < 0.6 * baseline["rmse"] and results["abs_rel"] < 0.5 * baseline["abs_rel"]
    assert results["a1"] > baseline["a1"] + 0.3
    printed = capsys.readouterr().out
    assert "trained head:" in printed and "mean depth (" in printed
    assert (out / "training_curves.png").exists() and len(list((out / "predictions").glob("*_depth.png"))) == 4


def test_the_readme_quotes_the_demo_numbers_its_config_states():
    """What `dinoseg demo demo_depth.yaml` gives is measured once and written twice (README, the config's comment):
    the two must agree, metric by metric, for the trained head and the mean-depth baseline."""
    import re

    from .engine_utils import REPO

    pattern = r"RMSE (\d\.\d+) m, AbsRel (\d\.\d+), delta1 (\d\.\d+)"
    comment = [line.lstrip("# ") for line in (REPO / "dinoseg" / "configs" / "demo_depth.yaml").read_text().splitlines()]
    config = " ".join(" ".join(comment).split())
    readme = " ".join((REPO / "README.md").read_text().split())
    demo = readme[readme.index("`dinoseg demo demo_depth.yaml` trains"):]
    quoted = re.findall(pattern, config)
    assert len(quoted) == 2 and quoted == re.findall(pattern, demo)[:2]
