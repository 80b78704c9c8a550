import dataclasses

import pytest
from omegaconf import OmegaConf

from dinoseg.engine.config import Resume, config_dir, save_config
from dinoseg.eval.segmentation.config import (
    ConfigError,
    Precision,
    SegmentationConfig,
    load_config,
)


def test_defaults_yaml_and_cli_merge_in_order(tmp_path):
    yaml = tmp_path / "a.yaml"
    yaml.write_text("train:\n  batch_size: 4\noptimizer:\n  lr: 0.5\n")
    cfg = load_config([yaml], ["optimizer.lr=0.25", "precision=bfloat16"])
    assert cfg.train.batch_size == 4  # from the YAML
    assert cfg.optimizer.lr == 0.25  # the CLI wins over the YAML
    assert cfg.precision == Precision.BFLOAT16
    assert cfg.optimizer.weight_decay == SegmentationConfig().optimizer.weight_decay  # default kept


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.bach_size=3", "train.bach_size"),
        ("precision=fp8", "precision"),
        ("decoder_head.backbone_out_layers=SIX_LAST", "backbone_out_layers"),
        ("eval.eval_interval=50000", "eval.eval_interval=50000: must be in [1, scheduler.total_iter=40000]"),
        ("train.batch_size=abc", "train.batch_size"),
        ("decoder_head.type=unet", "decoder_head.type='unet'"),
        ("scheduler.warmup_iters=40000", "scheduler.warmup_iters"),
        ("eval.stride=0", "eval.stride"),
        ("nonsense", "expected key=value"),
        ("datasets.root={'a': [1", "value is not valid YAML"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config([], [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config([bad])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian:\n  batch_size: 2\n")
    with pytest.raises(ConfigError, match="trian"):
        load_config([unknown])


def test_required_values_of_the_ade20k_recipe():
    with pytest.raises(ConfigError, match=r"datasets.root: required value missing"):
        load_config(["ade20k_linear.yaml"], ["model.pretrained_weights=/w.pth"])
    with pytest.raises(ConfigError, match=r"model.pretrained_weights: required value missing"):
        load_config(["ade20k_linear.yaml"], ["datasets.root=/data"])


def test_official_ade20k_linear_recipe():
    cfg = load_config(["ade20k_linear.yaml"], ["model.pretrained_weights=/w.pth", "datasets.root=/data/ade"])
    assert cfg.scheduler.total_iter == 40_000 and cfg.scheduler.warmup_iters == 1500
    assert cfg.train.batch_size == 16
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (1e-3, 1e-3)
    assert (cfg.train.celoss_weight, cfg.train.diceloss_weight) == (1.0, 0.0)
    assert cfg.decoder_head.backbone_out_layers.value == "LAST" and cfg.decoder_head.use_batchnorm
    assert cfg.decoder_head.dropout == 0.1
    assert cfg.transforms.train.crop_size == 512 and list(cfg.transforms.train.random_img_size_ratio_range) == [0.5, 2.0]
    assert cfg.transforms.train.flip_prob == 0.5
    assert (cfg.eval.mode.value, cfg.eval.crop_size, cfg.eval.stride, cfg.eval.eval_interval) == ("slide", 512, 341, 5000)


def test_every_shipped_config_loads():
    from dinoseg.cli import load

    for path in sorted(config_dir().glob("*.yaml")):
        text = path.read_text()
        overrides = []
        if "???" in text:
            overrides = [f"{k}=/placeholder" for k in ("model.pretrained_weights", "datasets.root", "head")
                         if k.split(".")[-1] + ": ???" in text]
        runner, cfg = load([str(path), *overrides], "train")  # through the schema of the config's task
        assert runner.NAME == cfg.task, path.name


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config([], ["train.batch_size=6"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config([path])
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_every_field_is_documented_by_a_default():
    # Each dataclass field has a default, so `dinoseg train` with no YAML is a complete (demo-like) config.
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
            if dataclasses.is_dataclass(f.type):
                walk(f.type)

    walk(SegmentationConfig)


def test_train_resume_takes_yaml_booleans_and_auto(tmp_path):
    yaml = tmp_path / "a.yaml"
    for text, value in (("false", Resume.FALSE), ("true", Resume.TRUE), ("auto", Resume.AUTO), ("AUTO", Resume.AUTO)):
        yaml.write_text(f"train:\n  resume: {text}\n")
        assert load_config([yaml]).train.resume == value  # existing YAMLs write resume: false / true
        assert load_config([], [f"train.resume={text}"]).train.resume == value
        saved = save_config(load_config([yaml]), tmp_path / "saved.yaml")
        assert load_config([saved]).train.resume == value  # the resolved config reads back
    with pytest.raises(ConfigError, match=r"train.resume='sometimes': expected one of \['false', 'true', 'auto'\]"):
        load_config([], ["train.resume=sometimes"])
