"""From a depth config to the objects a run uses; below this file, functions take values, not the config."""

import inspect
import math

import torch
from omegaconf import DictConfig, OmegaConf

from ...data import DatasetError, DepthDataset, make_dataset
from ...data.depth_check import sampled_units_fault
from ...engine.adaptation import adapt_for_head, adapt_for_training, build_frozen_backbone, optimizer_groups
from ...engine.config import ConfigError, Precision
from ...engine.optim import build_optimizer as _build_optimizer
from ...models.precision import cast_weights
from .config import (
    DecoderConfig,
    loss_weights,
    make_depth_eval_transforms_from_config,
    make_depth_train_transforms_from_config,
)
from .eval import DepthEvalSettings
from .loss import MultiLoss
from .models import Depther, load_decoder_state_dict, make_depther_from_config
from .models.encoder import backbone_out_indices


def build_backbone(cfg: DictConfig) -> torch.nn.Module:
    """The frozen backbone of `model` (before any `model.finetune` adaptation)."""
    return build_frozen_backbone(cfg.model)


def decoder_config(cfg: DictConfig) -> DecoderConfig:
    return OmegaConf.to_object(cfg.decoder_head)


def adapt_backbone(cfg: DictConfig, backbone: torch.nn.Module) -> torch.nn.Module:
    """`backbone` adapted as `model.finetune` says, for training the configured head: blocks past the deepest one it
    reads (`decoder_head.backbone_out_layers`) never run, so they are neither adapted nor trained."""
    try:
        last = max(backbone_out_indices(backbone.n_blocks, decoder_config(cfg).backbone_out_layers))
    except ValueError as e:
        raise ConfigError(f"decoder_head: {e}") from None
    return adapt_for_training(backbone, cfg.model, last_read_block=last, seed=cfg.seed)


def _depther(cfg: DictConfig, backbone: torch.nn.Module) -> Depther:
    try:
        return make_depther_from_config(backbone, decoder_config(cfg), autocast_dtype=Precision(cfg.precision).dtype)
    except (ValueError, TypeError) as e:  # layer indices past the backbone's depth, bad head options...
        raise ConfigError(f"decoder_head: {e}") from None


def build_model(cfg: DictConfig, backbone: torch.nn.Module | None = None) -> Depther:
    """The configured depther with a freshly initialised head (in eval mode), its backbone adapted as
    `model.finetune` says."""
    return _depther(cfg, adapt_backbone(cfg, backbone if backbone is not None else build_backbone(cfg)))


def build_model_with_head(cfg: DictConfig, head_state_dict: dict, source: str) -> Depther:
    """The configured depther with its head loaded strictly from `head_state_dict` (named `source` in errors):
    ours (``decoder.*``, with the adapted tensors of an adapted backbone, which is rebuilt as the checkpoint
    records), the official trainer's (``module.*``) or a released head file (no prefix). With
    `model.weights_dtype` half, the head is stored in half precision too."""
    backbone = build_backbone(cfg)
    backbone = adapt_for_head(backbone, cfg.model, source)
    depther = _depther(cfg, backbone)
    load_decoder_state_dict(depther, head_state_dict, source=source)
    return cast_weights(depther, Precision(cfg.model.weights_dtype).dtype)


def build_criterion(cfg: DictConfig) -> MultiLoss:
    return MultiLoss(loss_weights(cfg.losses))


def build_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.AdamW:
    o, f = cfg.optimizer, cfg.model.finetune
    groups = optimizer_groups(model, o.weight_decay, lr_multiplier=f.lr_multiplier, layer_decay=f.layer_decay)
    return _build_optimizer(model, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, param_groups=groups)


def _depth_dataset(cfg: DictConfig, key: str, transforms) -> DepthDataset:
    """`datasets.<key>`, checked to be a depth dataset whose stored units are the ones the transforms divide by."""
    descriptor = cfg.datasets[key] if key != "test" else (cfg.datasets.test or cfg.datasets.val)
    dataset = make_dataset(descriptor, transforms=transforms, default_root=cfg.datasets.root)
    if not isinstance(dataset, DepthDataset):
        raise ConfigError(f"datasets.{key}={descriptor!r}: {type(dataset).__name__} is not a depth dataset "
                          f"(NYU, KITTI, DepthFolder, SyntheticDepth)")
    constant = cfg.transforms.normalization_constant
    if not math.isclose(dataset.depth_scale, constant, rel_tol=1e-6):
        raise ConfigError(f"transforms.normalization_constant={constant}: {type(dataset).__name__} (datasets.{key}) "
                          f"stores {dataset.depth_scale:g} units per metre; set transforms.normalization_constant="
                          f"{dataset.depth_scale:g}")
    return dataset


def build_train_dataset(cfg: DictConfig) -> DepthDataset:
    """`datasets.train`; with `datasets.check_units`, a sample of its depth maps must have plausible units (check-data's
    unit checks), so that a run never trains on depths off by a factor without a word."""
    dataset = _depth_dataset(cfg, "train", make_depth_train_transforms_from_config(cfg))
    if cfg.datasets.check_units:
        fault = sampled_units_fault(dataset)
        if fault is not None:
            fix = ("add depth_scale=N (its stored units per metre) to datasets.train and set "
                   "transforms.normalization_constant=N" if "depth_scale" in inspect.signature(type(dataset)).parameters
                   else f"{type(dataset).__name__} reads {dataset.depth_scale:g} units per metre: check the files")
            raise DatasetError(f"{fault.path}: {fault.fault}: {fix}, or set datasets.check_units=false to train on "
                               "these depths as they are")
    return dataset


def build_val_dataset(cfg: DictConfig) -> DepthDataset:
    """The validation set of training (no TTA, as the official validation)."""
    return _depth_dataset(cfg, "val", make_depth_eval_transforms_from_config(cfg, split="val"))


def build_test_dataset(cfg: DictConfig) -> DepthDataset:
    """What `dinoseg eval` and the end of training evaluate: `datasets.test` (else `datasets.val`), with flip TTA
    when `eval.use_tta`."""
    return _depth_dataset(cfg, "test", make_depth_eval_transforms_from_config(cfg, split="test"))


def evaluation_settings(cfg: DictConfig, *, use_tta: bool) -> DepthEvalSettings:
    e = cfg.eval
    return DepthEvalSettings(metrics=tuple(cfg.metrics), eval_range=(e.min_depth, e.max_depth),
                             ignored_value=e.ignored_value, eval_mask=cfg.transforms.eval.eval_mask,
                             align_least_squares=e.align_least_squares, use_tta=use_tta)


def result_config(cfg: DictConfig):
    return OmegaConf.to_object(cfg.result_config)
