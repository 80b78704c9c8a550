"""DepthConfig: a dinoseg task config holding every key of the official depth schema (with its defaults), the
official recipes as shipped configs, and every value range checked when a config loads."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from dinoseg.engine.config import ConfigError, Precision
from dinoseg.engine.schedulers import SchedulerType
from dinoseg.eval.depth.config import (
    DepthConfig,
    ResultExtension,
    load_config,
    make_depth_eval_transforms_from_config,
    make_depth_train_transforms_from_config,
)
from dinoseg.eval.depth.loss import LossType
from dinoseg.eval.depth.models import DecoderConfig, PatchSizeAdaptationStrategy
from dinoseg.eval.depth.models.released import dpt_depther_config
from dinoseg.eval.depth.transforms import FixedCrop, LeftRightFlipAug, NormalizeDepth, RandomCrop

from ._depth_run import TINY_DEPTH

# Every key of the official `DepthConfig` (dinov3/eval/depth/config.py) -> the dinoseg key with the same meaning.
# `model.*` goes through the engine's ModelConfig; see the README for the value rules of the renamed keys.
OFFICIAL_TO_DINOSEG = {
    "bs": "train.batch_size",  # x n_gpus: ours is the total over all processes
    "n_gpus": "train.batch_size",
    "num_workers": "train.num_workers",
    "seed": "seed",
    "model_dtype": "precision",
    "load_from": "head",
    "output_dir": "output_dir",
    "scheduler.type": "scheduler.type",
    "scheduler.total_iter": "scheduler.total_iter",
    **{f"scheduler.constructor_kwargs.{k}": f"scheduler.{k}" for k in (
        "warmup_iters", "warmup_ratio", "div_factor", "final_div_factor", "use_beta1", "base_momentum", "max_momentum")},
    **{f"optimizer.{k}": f"optimizer.{k}" for k in ("lr", "beta1", "beta2", "weight_decay", "gradient_clip")},
    **{f"datasets.{k}": f"datasets.{k}" for k in ("root", "train", "val", "test")},
    **{f"decoder_head.{f.name}": f"decoder_head.{f.name}" for f in dataclasses.fields(DecoderConfig)},
    **{f"losses.{t.name}": f"losses.{t.name}" for t in LossType},
    **{f"transforms.train.{k}": f"transforms.train.{k}" for k in (
        "img_size", "random_crop", "brightness_range", "rotation_angle", "fixed_crop", "eval_mask")},
    **{f"transforms.eval.{k}": f"transforms.eval.{k}" for k in ("img_size", "fixed_crop", "eval_mask")},
    **{f"transforms.{k}": f"transforms.{k}" for k in ("mean", "std", "normalization_constant")},
    **{f"eval.{k}": f"eval.{k}" for k in (
        "ignored_value", "align_least_squares", "min_depth", "max_depth", "use_tta", "eval_interval")},
    "metrics": "metrics",
    **{f"result_config.{k}": f"result_config.{k}" for k in (
        "save_results", "extension", "save_resolution", "overlay_alpha", "save_separate_files")},
}

# Official defaults (DepthConfig() and WarmupOneCycleLR's keywords), under the dinoseg keys.
OFFICIAL_DEFAULTS = {
    "train.batch_size": 16, "train.num_workers": 2, "seed": 321, "precision": Precision.FLOAT32, "head": None,
    "scheduler.type": SchedulerType.WarmupOneCycleLR, "scheduler.total_iter": 38_400, "scheduler.warmup_iters": 0,
    "scheduler.warmup_ratio": 0.0, "scheduler.div_factor": 25.0, "scheduler.final_div_factor": 1000.0,
    "scheduler.use_beta1": True, "scheduler.base_momentum": 0.85, "scheduler.max_momentum": 0.95,
    "optimizer.lr": 1e-4, "optimizer.beta1": 0.9, "optimizer.beta2": 0.999, "optimizer.weight_decay": 0.01,
    "optimizer.gradient_clip": 35.0, "transforms.train.img_size": None, "transforms.train.random_crop": None,
    "transforms.train.brightness_range": [0.9, 1.1], "transforms.train.rotation_angle": 2.5,
    "transforms.train.fixed_crop": "FULL", "transforms.train.eval_mask": "FULL", "transforms.eval.img_size": None,
    "transforms.eval.fixed_crop": "FULL", "transforms.eval.eval_mask": "FULL", "transforms.normalization_constant": 1000.0,
    "eval.ignored_value": 0.0, "eval.align_least_squares": False, "eval.min_depth": 0.001, "eval.max_depth": 10.0,
    "eval.use_tta": True, "eval.eval_interval": 1600, "metrics": ["rmse", "abs_rel", "a1"],
    "result_config.save_results": False, "result_config.extension": ResultExtension.JPG,
    "result_config.save_resolution": None, "result_config.overlay_alpha": 1.0, "result_config.save_separate_files": False,
}


def test_every_official_key_has_a_dinoseg_key():
    cfg = OmegaConf.structured(DepthConfig)
    for official, ours in OFFICIAL_TO_DINOSEG.items():
        assert OmegaConf.select(cfg, ours, default="absent") != "absent", f"{official} -> {ours}"


def test_official_defaults():
    cfg = OmegaConf.structured(DepthConfig)
    got = {key: OmegaConf.select(cfg, key) for key in OFFICIAL_DEFAULTS}
    got = {k: OmegaConf.to_container(v) if OmegaConf.is_list(v) else v for k, v in got.items()}
    assert got == OFFICIAL_DEFAULTS
    assert (cfg.losses.SIGLOSS, cfg.losses.GRADIENT_LOSS, cfg.losses.GRADIENT_LOG_LOSS, cfg.losses.L1) == (1, 0, 0, 0)
    assert cfg.task == "depth" and cfg.datasets.test is None  # test: None evaluates datasets.val
    assert OmegaConf.to_object(cfg.decoder_head) == DecoderConfig()  # the official decoder defaults, unchanged


def test_the_nyu_recipe_makes_its_transforms():
    cfg = load_config(["nyu_linear.yaml"], ["model.pretrained_weights=/w/vitl16.pth", "datasets.root=/data/nyu"])
    assert (cfg.optimizer.lr, cfg.optimizer.beta2, cfg.optimizer.weight_decay) == (3e-4, 0.99, 1e-4)
    assert (cfg.scheduler.warmup_iters, cfg.scheduler.final_div_factor, cfg.scheduler.use_beta1) == (12800, 1000.0, True)
    assert cfg.train.batch_size == 16 and cfg.seed == 321 and cfg.losses.SIGLOSS == 1.0
    assert cfg.decoder_head.backbone_out_layers == "LAST" and cfg.decoder_head.use_batchnorm
    assert OmegaConf.to_object(cfg.decoder_head).adapt_to_patch_size is PatchSizeAdaptationStrategy.CENTER_PADDING
    train = make_depth_train_transforms_from_config(cfg)
    assert any(isinstance(t, RandomCrop) and t.size == (416, 544) for t in train.transforms)
    assert any(isinstance(t, FixedCrop) and t.crop_type.value == "NYU" for t in train.transforms)
    assert any(isinstance(t, NormalizeDepth) and t.factor == 1000.0 for t in train.transforms)
    flips = [t for t in make_depth_eval_transforms_from_config(cfg, "test").transforms if isinstance(t, LeftRightFlipAug)]
    assert flips[0]._flip  # TTA for the test split only
    val = make_depth_eval_transforms_from_config(cfg, "val")
    assert not [t for t in val.transforms if isinstance(t, LeftRightFlipAug)][0]._flip
    with pytest.raises(ValueError, match="split must be 'val' or 'test'"):
        make_depth_eval_transforms_from_config(cfg, "train")


def test_the_inference_config_describes_the_released_head():
    cfg = load_config(["nyu_dpt_vit7b16_inference.yaml"], ["model.pretrained_weights=/w/7b.pth", "datasets.root=/d"])
    assert OmegaConf.to_object(cfg.decoder_head) == dpt_depther_config("dinov3_vit7b16")
    assert cfg.head == "dinov3_vit7b16_dd" and cfg.model.dino_hub == "dinov3_vit7b16"
    assert (cfg.transforms.eval.img_size, cfg.transforms.eval.eval_mask) == (768, "NYU_EIGEN")
    assert cfg.eval.use_tta and cfg.eval.align_least_squares and cfg.eval.max_depth == 10.0


@pytest.mark.parametrize("name, required", [("nyu_linear.yaml", "datasets.root"),
                                            ("nyu_dpt_vit7b16_inference.yaml", "datasets.root"),
                                            ("demo_depth.yaml", None)])
def test_shipped_depth_configs_load(name, required):
    if required:
        with pytest.raises(ConfigError, match=f"{required}: required value missing"):
            load_config([name], ["model.pretrained_weights=/w.pth"])
        with pytest.raises(ConfigError, match=f"{required}: required value missing"):
            load_config([name], [], require=("datasets.",))  # what check-data needs
        assert load_config([name], [], require=()).task == "depth"
    else:
        assert load_config([name]).task == "depth"


@pytest.mark.parametrize("override, message", [
    ("task=segmentation", "this is a depth config"),
    ("decoder_head.type=unet", "expected one of ['linear', 'dpt']"),
    ("decoder_head.bins_strategy=cubic", "expected one of"),
    ("decoder_head.norm_strategy=relu", "expected one of"),
    ("decoder_head.min_depth=0", "must be positive"),
    ("decoder_head.max_depth=0.0001", "must be > decoder_head.min_depth"),
    ("decoder_head.n_output_channels=0", "must be positive"),
    ("decoder_head.backbone_out_layers=LAST_TWO", "expected one of"),
    ("decoder_head.backbone_out_layers=[1,-2]", "list of block indices"),
    ("decoder_head.head_kwargs.channels=8", "decoder_head.head_kwargs.channels=8: not an option of the linear head"),
    ("decoder_head.adapt_to_patch_size=crop", "expected one of"),
    ("losses.SIGLOSS=-1", "must be a finite weight >= 0"),
    ("losses.SIGLOSS=0", "no loss to train"),
    ("losses.SILOG=1", "losses.SILOG"),
    ("scheduler.base_momentum=1.0", "must be in [0, 1)"),
    ("scheduler.base_momentum=0.97", "must be <= scheduler.max_momentum=0.95"),
    ("transforms.train.img_size=[1,2,3]", "expected a positive int"),
    ("transforms.train.random_crop=[0,64]", "expected a positive int"),
    ("transforms.train.brightness_range=[1.2,0.8]", "0 < low <= high"),
    ("transforms.train.rotation_angle=-1", "must be in [0, 180]"),
    ("transforms.train.fixed_crop=KITTI", "expected one of FULL, NYU, KITTI_KB"),
    ("transforms.train.eval_mask=NYU", "expected one of FULL, NYU_EIGEN"),
    ("transforms.eval.img_size=-5", "expected a positive int"),
    ("transforms.eval.eval_mask=EIGEN", "expected one of FULL"),
    ("transforms.normalization_constant=0", "must be > 1e-6"),
    ("transforms.std=[1,0,1]", "3 positive values"),
    ("eval.min_depth=-1", "must be positive"),
    ("eval.max_depth=0.0001", "must be > eval.min_depth"),
    ("eval.ignored_value=nan", "eval.ignored_value"),
    ("eval.eval_interval=11", "must be in [1, scheduler.total_iter=10]"),
    ("eval.max_val_samples=0", "must be positive"),
    ("eval.metric_to_save=a2", "must be one of metrics"),
    ("metrics=[rmse,rmse]", "distinct names"),
    ("metrics=[rmse,psnr]", "distinct names among"),
    ("metrics=[]", "distinct names"),
    ("result_config.overlay_alpha=1.5", "must be in [0, 1]"),
    ("result_config.save_resolution=0", "must be positive"),
    ("result_config.extension=gif", "expected one of"),
    ("datasets.train=''", "expected a dataset descriptor"),
    ("precision=float8", "precision"),
])
def test_bad_values_are_refused_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as error:
        load_config([], TINY_DEPTH + ["scheduler.total_iter=10", "eval.eval_interval=10", override])
    assert message in str(error.value) and override.split("=")[0].split(".")[-1] in str(error.value)


def test_layer_names_are_normalised_and_dpt_options_accepted():
    cfg = load_config([], TINY_DEPTH + ["decoder_head.backbone_out_layers=four_last", "decoder_head.type=dpt",
                                        "decoder_head.head_kwargs.channels=8", "precision=bfloat16"])
    assert cfg.decoder_head.backbone_out_layers == "FOUR_LAST" and Precision(cfg.precision).dtype is torch.bfloat16
