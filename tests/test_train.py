import json

import pytest
import torch

from dinoseg.cli import main
from dinoseg.engine.checkpoint import BEST, LAST

from .engine_utils import assert_same_head, kill_and_resume, read_checkpoint, tiny


def test_train_then_eval_then_predict(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny(out, total_iter=40, eval_interval=20, checkpoint_interval=20)]) == 0
    for name in ("segmentation_config.yaml", LAST, BEST, "metrics.jsonl", "results-semantic-segmentation.csv",
                 "results-semantic-segmentation.json"):
        assert (out / name).exists(), name
    ckpt = read_checkpoint(out / LAST)
    assert ckpt["iteration"] == 40
    # Head only: the frozen backbone is never written.
    assert set(ckpt["model"]) == {f"segmentation_model.1.{k}" for k in
                                  ("batchnorm_layer.weight", "batchnorm_layer.bias", "batchnorm_layer.running_mean",
                                   "batchnorm_layer.running_var", "batchnorm_layer.num_batches_tracked",
                                   "conv.weight", "conv.bias")}
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if "val" in r] == [20, 40]  # every eval_interval, not every iteration
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    train_results = json.loads((out / "results-semantic-segmentation.json").read_text())
    assert train_results["mIoU"] > 0.3  # chance is ~1/6 on the synthetic classes

    # Evaluating the saved head reproduces the final validation exactly, in the run's eval/<head> folder: the
    # training run's own results are left as they are.
    before = {p: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["eval", str(out / "segmentation_config.yaml"), f"head={out / LAST}", "eval.save_predictions=true"]) == 0
    assert {p: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    eval_dir = out / "eval" / "checkpoint_last"
    eval_results = json.loads((eval_dir / "results-semantic-segmentation.json").read_text())
    assert eval_results["mIoU"] == train_results["mIoU"]
    assert len(list((eval_dir / "predictions").glob("*.png"))) == 6
    printed = capsys.readouterr().out
    assert "mIoU" in printed

    # Predict on images of any size, with TTA.
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (70, 45), (200, 30, 30)).save(images / "a.png")
    Image.new("L", (33, 90), 128).save(images / "b.jpg")
    pred_dir = tmp_path / "pred"
    assert main(["predict", str(out / "segmentation_config.yaml"), f"head={out / LAST}", "eval.use_tta=true",
                 "transforms.eval.tta_ratios=[0.75,1.0]", "--input", str(images), "--output", str(pred_dir)]) == 0
    mask = Image.open(pred_dir / "a_mask.png")
    assert mask.size == (70, 45) and mask.mode == "RGB"
    assert Image.open(pred_dir / "b_overlay.png").size == (33, 90)
    assert Image.open(pred_dir / "b_label.png").mode == "L"


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_head(tmp_path):
    """Kill a real training process after its first checkpoint, resume it, compare with an uninterrupted run."""
    total = 60

    def args(out):
        return ["train", *tiny(out, total_iter=total, eval_interval=30, checkpoint_interval=10,
                               extra=["eval.max_val_samples=2"])]

    assert_same_head(*kill_and_resume(args, tmp_path, total), total)


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    def error_of(args):
        code = main(args)
        err = capsys.readouterr().err.strip()
        assert code != 0
        assert err.startswith("dinoseg: error: ") and "\n" not in err, err
        return err

    base = tiny(tmp_path / "r", total_iter=4)
    assert "root" in error_of(["train", *base, "datasets.train=ADE20K:split=TRAIN:root=/nonexistent/ade"])
    missing_weights = ["model.dino_hub=dinov3_vits16", "model.backbone_kwargs={}", "model.random_init=false",
                       "model.pretrained_weights=/missing/w.pth"]
    assert "/missing/w.pth: checkpoint file not found" in error_of(["train", *base, *missing_weights])
    assert "train.bach_size" in error_of(["train", *base, "train.bach_size=2"])
    assert "precision" in error_of(["train", *base, "precision=float8"])
    assert "eval.eval_interval=9" in error_of(["train", *base, "eval.eval_interval=9"])
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert "cannot be created (Not a directory)" in error_of(["train", *base, f"output_dir={blocker / 'sub'}"])
    assert "head checkpoint not found" in error_of(["eval", *base, f"head={tmp_path / 'none.pth'}"])


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from dinoseg.eval.segmentation.decoders import LinearDecoder

    real = LinearDecoder.loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 6 else loss

    monkeypatch.setattr(LinearDecoder, "loss", staticmethod(poisoned))
    out = tmp_path / "r"
    assert main(["train", *tiny(out, total_iter=20, checkpoint_interval=5)]) == 2
    err = capsys.readouterr().err
    assert "loss is nan at iteration 6" in err and str(out / LAST) in err
    line = next(x for x in err.splitlines() if "dinoseg: error" in x)
    assert line.startswith("dinoseg: error: loss is nan")  # on its own line, not after the progress bar
    ckpt = read_checkpoint(out / LAST)
    assert ckpt["iteration"] == 5 and all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())


def test_released_segmentor_by_name_is_looked_up_locally(tmp_path, monkeypatch, capsys):
    # `head=dinov3_vit7b16_ms` selects the released 7B Mask2Former segmentor; its head is never downloaded.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    code = main(["eval", *tiny(tmp_path / "r", total_iter=4), "head=dinov3_vit7b16_ms"])
    err = capsys.readouterr().err
    assert code == 2 and "dinov3_vit7b16_ade20k_m2f_head-bf307cb1.pth" in err and "never downloads" in err


def test_bfloat16_training_on_cpu_and_float16_refused(tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["train", *tiny(out, total_iter=3, checkpoint_interval=3), "precision=bfloat16"]) == 0
    ckpt = read_checkpoint(out / LAST)
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["model"].values())  # master weights stay fp32
    assert main(["train", *tiny(tmp_path / "fp16", total_iter=3), "precision=float16"]) == 2
    assert "precision=float16 needs CUDA" in capsys.readouterr().err


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    assert main(["train", *tiny(out, total_iter=3, checkpoint_interval=3), "train.tensorboard=true"]) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_whole_image_mode_eval_and_predict(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *tiny(out, total_iter=3, checkpoint_interval=3), "eval.mode=whole",
                 "transforms.eval.img_size=56"]) == 0  # 56 is not a multiple of the patch: rounded up to 64
    results = json.loads((out / "results-semantic-segmentation.json").read_text())
    assert results["num_samples"] == 6
    from PIL import Image

    Image.new("RGB", (50, 37), (10, 200, 10)).save(tmp_path / "x.png")
    assert main(["predict", str(out / "segmentation_config.yaml"), f"head={out / LAST}",
                 "--input", str(tmp_path / "x.png"), "--output", str(tmp_path / "pred")]) == 0
    assert Image.open(tmp_path / "pred" / "x_mask.png").size == (50, 37)


def test_eval_and_predict_reuse_one_accumulator_buffer(tmp_path, monkeypatch):
    """Every image of an eval / predict loop takes its sliding-window accumulator from the same buffer."""
    from dinoseg.eval.segmentation import inference
    from dinoseg.eval.segmentation.inference import AccumulatorBuffer, make_tta_inference

    buffers = []

    def spy(*args, **kwargs):
        buffers.append(kwargs["buffer"])
        return make_tta_inference(*args, **kwargs)

    monkeypatch.setattr(inference, "make_tta_inference", spy)
    out = tmp_path / "run"
    assert main(["train", *tiny(out, total_iter=3, checkpoint_interval=3)]) == 0
    assert len(buffers) == 6 and isinstance(buffers[0], AccumulatorBuffer)
    assert all(b is buffers[0] for b in buffers)
    from PIL import Image

    for name, size in (("a.png", (50, 37)), ("b.png", (30, 60))):
        Image.new("RGB", size, (10, 200, 10)).save(tmp_path / name)
    buffers.clear()
    assert main(["predict", str(out / "segmentation_config.yaml"), f"head={out / LAST}",
                 "--input", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--output", str(tmp_path / "p")]) == 0
    assert len(buffers) == 2 and buffers[0] is buffers[1]
    assert Image.open(tmp_path / "p" / "b_label.png").size == (30, 60)


@pytest.mark.parametrize("items", [[], ["empty.yaml"], ["empty.yaml", "output_dir=runs/x", "scheduler.total_iter=9"]])
def test_train_without_a_config_says_what_to_pass(tmp_path, monkeypatch, capsys, items):
    """Defaults alone (synthetic data, 40,000 iterations into runs/default) never start a run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert main(["train", *items]) == 2
    err = capsys.readouterr().err.strip()
    what = "empty.yaml sets nothing" if items else "no config file given"
    assert err.startswith(f"dinoseg: error: train: {what}; pass a config, e.g. `dinoseg train demo.yaml`"), err
    assert "\n" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]  # nothing written
