"""The backbone of a run, the same for every task: the frozen backbone a config's `model` section describes, the
one a training run adapts (`model.finetune`), the one `eval` / `predict` / `export` rebuild from a head checkpoint,
and the optimizer's parameter groups.

A task's `setup.py` builds the frozen backbone (`build_frozen_backbone`), then calls `adapt_for_training` (with the deepest
block its head reads) or `adapt_for_head` (with the head checkpoint); the rest of the engine reads the adaptation
from the model itself: checkpoints record it (`checkpoint.save_checkpoint`), a resume checks it, DDP ignores the frozen tensors
only (`training.wrap_distributed`), an export merges LoRA into the weights (`export.write_onnx`).
"""

import logging

from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..models.backbones import Weights
from ..models.backbones import build_backbone as build_hub_or_custom_backbone
from ..models.finetune import (
    FinetuneError,
    adapt_as_recorded,
    adapt_backbone,
    adapted_backbones,
    backbone_identity,
    param_groups,
    read_adaptation_record,
)
from ..models.frozen import freeze_backbone
from .config import ConfigError, Precision, finetune_kwargs

logger = logging.getLogger("dinoseg")


def build_frozen_backbone(model: DictConfig) -> nn.Module:
    """The frozen backbone that a config's `model` section describes: a hub name or `backbone_kwargs`, its weights
    (or random ones when `random_init`), stored in `weights_dtype`."""
    kwargs = OmegaConf.to_container(model.backbone_kwargs, resolve=True)
    backbone = build_hub_or_custom_backbone(model.dino_hub, model.pretrained_weights, kwargs, model.random_init_seed,
                                            dtype=Precision(model.weights_dtype).dtype, random_init=model.random_init)
    return freeze_backbone(backbone)


def base_identity(backbone: nn.Module, model: DictConfig) -> dict:
    """`models.finetune.backbone_identity` of a backbone built from the `model` section (no weights given for a hub
    name: its released LVD1689M file, which is what `build_frozen_backbone` loads)."""
    weights = None if model.random_init else (model.pretrained_weights or
                                              (Weights.LVD1689M.value if model.dino_hub else None))
    return backbone_identity(backbone, model.dino_hub, weights, model.random_init_seed)


def adapt_for_training(backbone: nn.Module, model: DictConfig, *, last_read_block: int, seed: int) -> nn.Module:
    """`backbone` (built from the `model` section) adapted as `model.finetune` says, for training a head that reads
    blocks up to `last_read_block`. A value that cannot apply to this backbone is a `ConfigError` naming the key.
    `mode: frozen` returns `backbone` untouched."""
    finetune = finetune_kwargs(model.finetune)
    if finetune["mode"] == "frozen":
        return backbone
    try:
        return adapt_backbone(backbone, **finetune, last_read_block=last_read_block, seed=seed,
                              identity=base_identity(backbone, model))
    except FinetuneError as e:
        raise ConfigError(str(e)) from None


def adapt_for_head(backbone: nn.Module, model: DictConfig, head: str) -> nn.Module:
    """`backbone` (built from the `model` section) adapted as the head checkpoint `head` records (`model.finetune`
    of the run that trained it, whatever the config says now), after checking that it is the backbone the
    checkpoint was trained on; a head trained on a frozen backbone (or an official or released head file) leaves it
    untouched."""
    record = read_adaptation_record(head)
    if record is None:
        return backbone
    settings = record["finetune"]
    logger.info("%s: backbone adapted as it was trained (%s)", head,
                ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None))
    return adapt_as_recorded(backbone, record, base_identity(backbone, model), source=str(head))


def optimizer_groups(model: nn.Module, weight_decay: float, *, lr_multiplier: float,
                     layer_decay: float) -> list[dict] | None:
    """The parameter groups of `optim.build_optimizer` for a model whose backbone is adapted: the head at the
    optimizer's lr, the adapted tensors at `lr_multiplier` x `layer_decay` ** depth of it; None for a frozen
    backbone (the one group of every run before adaptation existed, unchanged)."""
    if not adapted_backbones(model):
        return None
    try:
        return param_groups(model, weight_decay, lr_multiplier=lr_multiplier, layer_decay=layer_decay)
    except FinetuneError as e:
        raise ConfigError(str(e)) from None


__all__ = ["adapt_for_head", "adapt_for_training", "base_identity", "build_frozen_backbone", "optimizer_groups"]
