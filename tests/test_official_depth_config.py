"""Depth configs of the official DINOv3 code, read unchanged: told apart from segmentation ones by their keys,
translated key by key onto dinoseg's depth config (the same effective config as the shipped recipes written in dinoseg
keys), refused in one line where dinoseg cannot honour a value, and run end to end on tiny synthetic data. The tests
write the official files' keys and values themselves; when the official repository's mirror is on this machine, they
check that these are the files' contents."""

import logging

import pytest
from omegaconf import OmegaConf

from dinoseg.cli import load, main
from dinoseg.engine.config import ConfigError
from dinoseg.eval.depth.official_config import DEPTH
from dinoseg.eval.depth.run import OFFICIAL
from dinoseg.eval.segmentation.official_config import SEGMENTATION

from ._depth_run import BACKBONE
from ._official_yaml import LINEAR, M2F, NYU, SYNTHMIX, needs_mirror, official_file

# The tiny settings of a run on synthetic scenes, given as official keys where the official schema has them.
TINY_OFFICIAL = [
    "device=cpu", *BACKBONE, "datasets.root=unused", "num_workers=0", "bs=2", "n_gpus=1",
    "datasets.train=SyntheticDepth:split=TRAIN:num_samples=8:image_size=64",
    "datasets.val=SyntheticDepth:split=VAL:num_samples=2:image_size=64",
    "datasets.test=SyntheticDepth:split=VAL:num_samples=2:image_size=64",
    "decoder_head.n_output_channels=16", "transforms.train.random_crop=[48,48]", "transforms.train.fixed_crop=FULL",
    "transforms.eval.eval_mask=FULL", "scheduler.total_iter=4", "scheduler.constructor_kwargs.warmup_iters=2",
]


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "config.yaml") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


@pytest.fixture
def official(write):
    return {"nyu": write(NYU, "config-nyu.yaml"), "synthmix": write(SYNTHMIX, "config-nyu-synthmix-dpt-inference.yaml")}


@needs_mirror
@pytest.mark.parametrize(("name", "text"), [("config-nyu.yaml", NYU), ("config-nyu-synthmix-dpt-inference.yaml", SYNTHMIX)])
def test_these_are_the_official_files(name, text):
    content = official_file(f"dinov3/eval/depth/configs/{name}")
    assert OmegaConf.to_container(OmegaConf.create(content)) == OmegaConf.to_container(OmegaConf.create(text))


def test_the_depth_task_exposes_its_official_schema():
    assert OFFICIAL is DEPTH


def _as_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def test_official_nyu_config_is_the_shipped_recipe(official, caplog):
    """`nyu_linear.yaml` claims to be config-nyu.yaml in dinoseg keys: the translation gives the same config, key for key
    (the official file names no backbone, weights, data root or output directory: given to both)."""
    required = ["model.dino_hub=dinov3_vitl16", "model.pretrained_weights=/w/vitl16.pth", "datasets.root=/data/nyu",
                "output_dir=/runs/nyu"]
    with caplog.at_level(logging.INFO, logger="dinoseg"):
        runner, theirs = load([official["nyu"], *required], "train")
    _, ours = load(["nyu_linear.yaml", *required], "train")
    assert runner.NAME == "depth"
    assert _as_dict(theirs) == _as_dict(ours)
    # The translation is logged once, as one block naming every key.
    (block,) = [r.getMessage() for r in caplog.records if "official DINOv3" in r.getMessage()]
    assert block.startswith("official DINOv3 depth config")
    for line in ("bs x n_gpus -> train.batch_size=16", "losses -> losses.SIGLOSS=1.0", "losses -> losses.L1=0.0",
                 "decoder_head.max_depth -> decoder_head.max_depth=10.0",
                 "eval.eval_interval -> train.checkpoint_interval=1600 (official default)"):
        assert line in block


def test_official_inference_config_is_the_shipped_recipe(official):
    """config-nyu-synthmix-dpt-inference.yaml with `load_from=dinov3_vit7b16_dd` is `nyu_dpt_vit7b16_inference.yaml`
    (the released depther brings its backbone and head); it evaluates only, so it needs no training data."""
    common = ["datasets.root=/data/nyu", "output_dir=/runs/eval", "model.pretrained_weights=/w/7b.pth"]
    runner, theirs = load([official["synthmix"], "load_from=dinov3_vit7b16_dd", *common], "eval")
    _, ours = load(["nyu_dpt_vit7b16_inference.yaml", *common], "eval")
    assert runner.NAME == "depth"
    theirs, ours = _as_dict(theirs), _as_dict(ours)
    for split in ("train", "val"):  # not given, not read: only the shipped file names them
        del theirs["datasets"][split], ours["datasets"][split]
    assert theirs == ours
    # Without weights, the released depther's backbone weights from the torch hub cache (as the official hub loads).
    _, cfg = load([official["synthmix"], "load_from=dinov3_vit7b16_dd", "datasets.root=/d"], "eval")
    assert (cfg.model.dino_hub, cfg.model.pretrained_weights) == ("dinov3_vit7b16", "LVD1689M")


def test_official_defaults_complete_a_file(write):
    """A key the official file leaves out has the official default, where dinoseg's differs too."""
    text = "bs: 4\nlosses: {L1: 2}\nmetrics: [abs_rel, a1]\ndatasets: {train: 'NYU:split=TRAIN', val: 'NYU:split=VAL'}\n"
    _, cfg = load([write(text), "model.dino_hub=dinov3_vits16", "model.pretrained_weights=/w.pth", "datasets.root=/d",
                   "scheduler.total_iter=1000"], "train")
    assert cfg.train.batch_size == 32 and cfg.seed == 321 and cfg.optimizer.lr == 1e-4
    assert dict(cfg.losses) == {"SIGLOSS": 0.0, "GRADIENT_LOSS": 0.0, "GRADIENT_LOG_LOSS": 0.0, "L1": 2.0}
    assert (cfg.decoder_head.max_depth, cfg.decoder_head.backbone_out_layers, cfg.decoder_head.use_batchnorm) == (
        80.0, "FOUR_EVEN_INTERVALS", False)
    assert cfg.datasets.test is None  # officially the final evaluation then fails; dinoseg evaluates datasets.val
    # eval_interval 1600 > total_iter: officially one validation (and checkpoint) after the last iteration.
    assert (cfg.eval.eval_interval, cfg.train.checkpoint_interval) == (1000, 1000)
    assert cfg.eval.metric_to_save == "abs_rel"  # rmse is not computed: best checkpoint by the first metric
    s = cfg.scheduler
    assert (s.warmup_iters, s.warmup_ratio, s.final_div_factor, s.use_beta1) == (0, 0.0, 1000.0, True)


def test_a_linear_head_ignores_head_kwargs_as_officially(official, caplog):
    required = ["model.dino_hub=dinov3_vitl16", "model.pretrained_weights=/w.pth", "datasets.root=/d"]
    with caplog.at_level(logging.INFO, logger="dinoseg"):
        _, cfg = load([official["nyu"], *required, "decoder_head.head_kwargs.channels=8"], "train")
    assert dict(cfg.decoder_head.head_kwargs) == {}
    assert "decoder_head.head_kwargs={'channels': 8}: ignored" in caplog.text
    _, cfg = load([official["nyu"], *required, "decoder_head.type=dpt", "decoder_head.head_kwargs.channels=8"], "train")
    assert dict(cfg.decoder_head.head_kwargs) == {"channels": 8}


def test_missing_training_data_is_required(official, write):
    with pytest.raises(ConfigError, match="datasets.train: required value missing"):
        load([write("bs: 2\nlosses: {SIGLOSS: 1.0}\n"), "model.dino_hub=dinov3_vits16", "datasets.root=/d"], "train")
    with pytest.raises(ConfigError, match="datasets.root: required value missing"):
        load([official["nyu"], "model.dino_hub=dinov3_vits16"], "train")


def test_official_nyu_config_trains_and_evaluates(official, tmp_path, capsys):
    """`dinoseg train config-nyu.yaml ...` then `dinoseg eval config-nyu.yaml load_from=<head>` on tiny scenes."""
    out = tmp_path / "run"
    assert main(["train", official["nyu"], *TINY_OFFICIAL, f"output_dir={out}"]) == 0
    saved = OmegaConf.load(out / "depth_config.yaml")
    assert saved.task == "depth" and saved.train.batch_size == 2 and saved.optimizer.lr == 3e-4
    assert (saved.eval.eval_interval, saved.train.checkpoint_interval, saved.scheduler.warmup_iters) == (4, 4, 2)
    assert saved.losses.SIGLOSS == 1.0 and saved.transforms.train.brightness_range == [0.75, 1.25]
    assert (out / "results-depth.csv").exists() and (out / "model_final.pth").exists()
    capsys.readouterr()
    assert main(["eval", official["nyu"], *TINY_OFFICIAL, f"output_dir={out}", f"load_from={out / 'model_final.pth'}"]) == 0
    assert "results:" in capsys.readouterr().out
    assert (out / "eval" / "model_final" / "results-depth.csv").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("losses.HUBER=1.0", "losses.HUBER=1.0: not a depth loss"),
    ("model.config_file=/x/train.yaml", "model.config_file='/x/train.yaml': dinoseg builds backbones by hub name"),
    ("scheduler.type=WarmupMultiStepLR", "scheduler.type='WarmupMultiStepLR'"),
    ("optimizer.gradient_clip=0", "optimizer.gradient_clip=0.0: officially the gradient norm is clipped to it"),
    ("model_dtype=FLOAT16", "model_dtype='FLOAT16'"),
    ("train.batch_size=8", "train.batch_size=8: set together with the official bs x n_gpus"),
    ("eval.eval_interval=0", "eval.eval_interval=0: must be >= 1"),
])
def test_official_depth_values_that_cannot_be_honoured_are_refused(official, override, message, capsys):
    assert main(["train", official["nyu"], "model.dino_hub=dinov3_vits16", "datasets.root=/d", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinoseg: error: ") and message in err and err.count("\n") == 1


def test_the_task_of_an_official_config_is_told_by_its_keys(official, write, capsys):
    assert load([write(LINEAR), "model.dino_hub=dinov3_vitl16", "datasets.root=/d"], "train")[0].NAME == "segmentation"
    assert load([write(M2F), "load_from=dinov3_vit7b16_ms", "datasets.root=/d"], "eval")[0].NAME == "segmentation"
    assert load([official["nyu"], "model.dino_hub=dinov3_vitl16", "datasets.root=/d"], "train")[0].NAME == "depth"
    # An explicit task wins: the same task is honoured, another is refused in one line.
    assert load([official["nyu"], "task=depth", "model.dino_hub=dinov3_vitl16", "datasets.root=/d"], "train")[0].NAME == "depth"
    assert main(["train", official["nyu"], "task=segmentation", "model.dino_hub=dinov3_vitl16", "datasets.root=/d"]) == 2
    err = capsys.readouterr().err
    assert "task='segmentation': the config is an official depth config (it has losses, datasets.test" in err
    assert err.count("\n") == 1
    # Keys of both tasks without `task`: which one is meant cannot be told.
    with pytest.raises(ConfigError, match=r"mixes keys of several tasks \(segmentation: metric_to_save; depth: losses"):
        load([official["nyu"], "metric_to_save=mIoU", "model.dino_hub=dinov3_vitl16", "datasets.root=/d"], "train")
    # dinoseg's own configs are not official ones, whatever keys they share with the official depth schema.
    assert load(["ade20k_linear.yaml", "model.pretrained_weights=/w.pth", "datasets.root=/d"], "train")[0].NAME == (
        "segmentation")


def test_each_task_claims_only_its_own_official_keys():
    for schema, other in ((DEPTH, SEGMENTATION), (SEGMENTATION, DEPTH)):
        for key in schema.own_keys:
            assert key in schema.defaults or any(k.startswith(f"{key}.") for k in schema.defaults), key
            assert key not in other.defaults and not any(k.startswith(f"{key}.") for k in other.defaults), key
