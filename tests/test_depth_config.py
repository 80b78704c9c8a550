"""DepthConfig: the official schema (field names, defaults) as typed dataclasses, and the transforms it makes."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from dinoseg.eval.depth.config import (
    DepthConfig,
    Dtype,
    ResultExtension,
    make_depth_eval_transforms_from_config,
    make_depth_train_transforms_from_config,
)
from dinoseg.eval.depth.loss import LossType
from dinoseg.eval.depth.models import DecoderConfig, PatchSizeAdaptationStrategy
from dinoseg.eval.depth.transforms import LeftRightFlipAug, NormalizeDepth, RandomCrop

# The settings of the official NYU linear recipe (configs/config-nyu.yaml).
NYU_RECIPE = {
    "bs": 2, "n_gpus": 8, "seed": 321,
    "scheduler": {"total_iter": 38400, "type": "WarmupOneCycleLR",
                  "constructor_kwargs": {"final_div_factor": 1000.0, "warmup_iters": 12800, "base_momentum": 0.85,
                                         "max_momentum": 0.95}},
    "optimizer": {"lr": 3e-4, "beta1": 0.9, "beta2": 0.99, "weight_decay": 1e-4, "gradient_clip": 35},
    "datasets": {"root": "/data/nyu", "train": "NYU:split=TRAIN", "val": "NYU:split=VAL", "test": "NYU:split=VAL"},
    "decoder_head": {"min_depth": 0.001, "max_depth": 10.0, "use_backbone_norm": True, "use_batchnorm": True,
                     "backbone_out_layers": "LAST", "type": "linear", "use_cls_token": False, "n_output_channels": 256},
    "losses": {"SIGLOSS": 1.0},
    "transforms": {"train": {"random_crop": [416, 544], "brightness_range": [0.75, 1.25], "fixed_crop": "NYU",
                             "eval_mask": "FULL"},
                   "eval": {"fixed_crop": "FULL", "eval_mask": "NYU_EIGEN"}},
    "eval": {"min_depth": 0.001, "max_depth": 10.0, "use_tta": True, "align_least_squares": False},
}


def test_official_defaults():
    config = DepthConfig()
    assert (config.bs, config.n_gpus, config.num_workers, config.seed) == (2, 8, 2, 321)
    assert (config.optimizer.lr, config.optimizer.weight_decay, config.scheduler.total_iter) == (1e-4, 0.01, 38_400)
    assert config.transforms.normalization_constant == 1000.0 and config.transforms.train is None
    evaluation = config.eval
    assert (evaluation.min_depth, evaluation.max_depth, evaluation.use_tta, evaluation.eval_interval) == (0.001, 10.0, True, 1600)
    assert config.metrics == ["rmse", "abs_rel", "a1"] and config.result_config.extension is ResultExtension.JPG
    assert isinstance(config.decoder_head, DecoderConfig) and Dtype.BFLOAT16.autocast_dtype is torch.bfloat16
    names = {f.name for f in dataclasses.fields(DepthConfig)}
    assert names == {"model", "bs", "n_gpus", "num_workers", "seed", "scheduler", "optimizer", "datasets", "decoder_head",
                     "model_dtype", "losses", "transforms", "eval", "metrics", "result_config", "load_from", "output_dir"}


def test_the_nyu_recipe_fits_the_schema_and_makes_its_transforms():
    merged = OmegaConf.merge(OmegaConf.structured(DepthConfig), OmegaConf.create(NYU_RECIPE))
    config = OmegaConf.to_object(merged)
    assert config.losses == {LossType.SIGLOSS: 1.0}
    assert config.decoder_head.adapt_to_patch_size is PatchSizeAdaptationStrategy.CENTER_PADDING
    assert config.decoder_head.backbone_out_layers == "LAST" and config.optimizer.beta2 == 0.99
    train = make_depth_train_transforms_from_config(config)
    assert any(isinstance(t, RandomCrop) and t.size == (416, 544) for t in train.transforms)
    assert any(isinstance(t, NormalizeDepth) and t.factor == 1000.0 for t in train.transforms)
    flips = [t for t in make_depth_eval_transforms_from_config(config, "test").transforms if isinstance(t, LeftRightFlipAug)]
    assert flips[0]._flip  # TTA for the test split only
    val = make_depth_eval_transforms_from_config(config, "val")
    assert not [t for t in val.transforms if isinstance(t, LeftRightFlipAug)][0]._flip
    with pytest.raises(ValueError, match="split must be 'val' or 'test'"):
        make_depth_eval_transforms_from_config(config, "train")
    with pytest.raises(ValueError, match="transforms.train is not set"):
        make_depth_train_transforms_from_config(DepthConfig())
