"""ConvNeXt through the real command line: a FOUR_EVEN_INTERVALS linear head on unequal stage widths (train, eval,
predict) and a Mask2Former head on the stage pyramid, on the synthetic set; checkpoints hold the head only."""

import json

import pytest
from omegaconf import OmegaConf

from dinoseg.cli import main
from dinoseg.engine.checkpoint import LAST
from dinoseg.eval.segmentation.config import ConfigError, load_config
from dinoseg.eval.segmentation.setup import build_backbone

from .engine_utils import TINY, read_checkpoint, run_cli
from .test_m2f_train import M2F_TINY

WIDTHS = [8, 16, 24, 32]
# A tiny ConvNeXt with unequal stage widths (every released one has them), from the hub architecture by overrides.
CONVNEXT_TINY = [
    "model.dino_hub=dinov3_convnext_tiny",
    "model.random_init=true",
    "model.backbone_kwargs.depths=[1,1,1,1]",
    f"model.backbone_kwargs.dims=[{','.join(map(str, WIDTHS))}]",
] + [item for item in TINY if not item.startswith("model.")]


def _args(out, total_iter, extra=()):
    return [
        *CONVNEXT_TINY,
        f"output_dir={out}",
        f"scheduler.total_iter={total_iter}",
        f"eval.eval_interval={total_iter}",
        f"train.checkpoint_interval={total_iter}",
        *extra,
    ]


def _assert_head_only(ckpt):
    assert ckpt["model"] and all(k.startswith("segmentation_model.1.") for k in ckpt["model"]), sorted(ckpt["model"])


def test_four_even_intervals_linear_head_train_eval_predict(tmp_path):
    out = tmp_path / "run"
    done = run_cli(["train", *_args(out, 12, ["decoder_head.backbone_out_layers=FOUR_EVEN_INTERVALS",
                                               "train.log_interval=4"])])
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = read_checkpoint(out / LAST)
    _assert_head_only(ckpt)
    # Head input = the four stages side by side: 8 + 16 + 24 + 32 channels (the official code would use 4 x 32).
    assert ckpt["model"]["segmentation_model.1.conv.weight"].shape == (6, sum(WIDTHS), 1, 1)
    assert ckpt["model"]["segmentation_model.1.batchnorm_layer.running_mean"].shape == (sum(WIDTHS),)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    trained = json.loads((out / "results-semantic-segmentation.json").read_text())

    # Eval and predict through the same entry point, in-process (a subprocess each would only add start-up time).
    config = str(out / "segmentation_config.yaml")
    assert main(["eval", config, f"head={out / LAST}", f"output_dir={tmp_path / 'eval'}"]) == 0
    results = json.loads((tmp_path / "eval" / "eval" / "checkpoint_last" / "results-semantic-segmentation.json").read_text())
    assert results["num_samples"] == 6 and results["mIoU"] == trained["mIoU"]

    from PIL import Image

    Image.new("RGB", (45, 70), (30, 30, 220)).save(tmp_path / "x.png")
    assert main(["predict", config, f"head={out / LAST}", "eval.mode=whole", "--input", str(tmp_path / "x.png"),
                 "--output", str(tmp_path / "pred")]) == 0
    assert Image.open(tmp_path / "pred" / "x_mask.png").size == (45, 70)


def test_m2f_head_on_convnext_learns(tmp_path):
    out = tmp_path / "run"
    # ~7 s on one core. Measured window-mean losses: 30.5, 28.0, 27.9, 26.5, 25.4, 24.3.
    # The ViT-Adapter options a ViT config sets (as demo_m2f.yaml does) are ignored with one warning naming them.
    adapter = ["decoder_head.m2f.adapter.deform_num_heads=4", "decoder_head.m2f.adapter.with_cp=false"]
    done = run_cli(["train", *_args(out, 30, [*M2F_TINY, *adapter, "optimizer.lr=3e-3", "train.log_interval=5",
                                              "eval.max_val_samples=2"])])
    assert done.returncode == 0, done.stderr[-3000:]
    warned = [line for line in done.stderr.splitlines() if "ViT-Adapter options ignored" in line]
    assert len(warned) == 1 and warned[0].endswith(
        "decoder_head.m2f.adapter.deform_num_heads=4, decoder_head.m2f.adapter.with_cp=False"), warned
    ckpt = read_checkpoint(out / LAST)
    _assert_head_only(ckpt)  # the pyramid has no weights of its own, the backbone is never written
    # The pixel decoder's input projections follow the stage widths (levels 4, 3, 2).
    assert [ckpt["model"][f"segmentation_model.1.pixel_decoder.input_convs.{i}.0.weight"].shape[1]
            for i in range(3)] == [32, 24, 16]
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.85 * losses[0], losses



def test_ade20k_linear_recipe_on_convnext_tiny():
    required = ["model.pretrained_weights=/w.pth", "datasets.root=/data/ade"]
    cfg = load_config(["ade20k_linear_convnext_tiny.yaml"], required)
    vit = load_config(["ade20k_linear.yaml"], required)
    # The official linear recipe: the ViT recipe's data, head, schedule, transforms and evaluation.
    for section in ("datasets", "decoder_head", "scheduler", "transforms", "train", "eval"):
        assert OmegaConf.to_container(cfg[section]) == OmegaConf.to_container(vit[section]), section
    assert cfg.model.dino_hub == "dinov3_convnext_tiny" and cfg.decoder_head.backbone_out_layers.value == "LAST"
    assert cfg.optimizer.gradient_clip == vit.optimizer.gradient_clip == float("inf")  # none: the official recipe's 'inf'
    # Random weights (no file) on the hub architecture: the released ConvNeXt-T.
    cfg.model.pretrained_weights, cfg.model.random_init = None, True
    assert sum(p.numel() for p in build_backbone(cfg).parameters()) == 27_820_128


def test_unknown_hub_name_lists_the_convnexts():
    with pytest.raises(ConfigError, match=r"model.dino_hub='dinov3_convnext_huge': expected one of .*dinov3_convnext_tiny"):
        load_config([], ["model.dino_hub=dinov3_convnext_huge"])  # refused when the config loads


@pytest.mark.parametrize("head", ["linear", "m2f"])
def test_ddp_syncs_the_head_only_on_convnext(tmp_path, head):
    import torch
    import torch.distributed as dist

    from dinoseg.engine.training import wrap_distributed
    from dinoseg.eval.segmentation.setup import build_model

    extra = M2F_TINY if head == "m2f" else ["decoder_head.backbone_out_layers=FOUR_LAST"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model(load_config([], CONVNEXT_TINY + extra), num_classes=4)
        ddp = wrap_distributed(model, torch.device("cpu"))
        backbone = model.segmentation_model[0]
        backbone = backbone.backbone if head == "m2f" else backbone.feature_model
        assert {id(p) for p in ddp._module_parameters} == {id(p) for p in model.segmentation_model[1].parameters()}
        assert {id(p) for p in backbone.parameters()}.isdisjoint(id(p) for p in ddp._module_parameters)
    finally:
        dist.destroy_process_group()


def test_a_head_option_a_convnext_cannot_take_is_one_line(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", *_args(out, 4, [*M2F_TINY, "decoder_head.backbone_out_layers=LAST"])]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "dinoseg: error:" in line or "Traceback" in line]
    assert lines == ["dinoseg: error: decoder_head: Mask2Former on a ConvNeXt reads its four stages [0, 1, 2, 3] "
                     "(backbone_out_layers FOUR_LAST or FOUR_EVEN_INTERVALS), got [3]"], err[-2000:]
    assert not out.exists()


def test_a_vit_config_switched_to_a_convnext_says_what_cannot_apply(tmp_path, caplog):
    """demo_m2f.yaml with model.dino_hub=dinov3_convnext_tiny: the YAML's ViT-only backbone_kwargs are dropped with one
    warning naming them, the ViT patch size that a Mask2Former ConvNeXt cannot take is one line saying how to clear it,
    and with it cleared the run trains."""
    demo = ["demo_m2f.yaml", "model.dino_hub=dinov3_convnext_tiny", "model.backbone_kwargs.depths=[1,1,1,1]",
            "model.backbone_kwargs.dims=[8,16,24,32]", "device=cpu", "train.num_workers=0"]
    with caplog.at_level("WARNING", logger="dinoseg"):
        cfg = load_config(["demo_m2f.yaml"], demo[1:])
    assert "embed_dim" not in cfg.model.backbone_kwargs and cfg.model.backbone_kwargs.patch_size == 16
    warned = [r.getMessage() for r in caplog.records if "DinoVisionTransformer" in r.getMessage()]
    assert len(warned) == 1 and "model.backbone_kwargs.embed_dim=96" in warned[0], warned

    out = tmp_path / "run"
    small = [f"output_dir={out}", "scheduler.total_iter=2", "scheduler.warmup_iters=1", "eval.eval_interval=2",
             "datasets.train=Synthetic:split=TRAIN:num_samples=4:image_size=64",
             "datasets.val=Synthetic:split=VAL:num_samples=2:image_size=64", "train.batch_size=2"]
    done = run_cli(["train", *demo, *small])
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().splitlines()[-1].endswith("from a config: model.backbone_kwargs.patch_size=null)")
    assert "Traceback" not in done.stderr
    done = run_cli(["train", *demo, *small, "model.backbone_kwargs.patch_size=null"])
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_backbone_argument_no_architecture_takes_is_one_line():
    with pytest.raises(ConfigError, match=r"model.backbone_kwargs.dimz=\[1\]: not an argument of ConvNeXt \(expected one of "):
        load_config([], [*CONVNEXT_TINY, "model.backbone_kwargs.dimz=[1]"])
