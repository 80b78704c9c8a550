"""Backbone adaptation in a run (`model.finetune`), the same for every task: the backbone a training run adapts,
the one `eval` / `predict` / `export` rebuild from a head checkpoint, and the optimizer's parameter groups.

A task's `setup.py` builds its frozen backbone, then calls `adapt_for_training` (with the deepest block its head
reads) or `adapt_for_head` (with the head checkpoint); the rest of the engine reads the adaptation from the model
itself: checkpoints record it (`checkpoint.save_checkpoint`), a resume checks it, DDP ignores the frozen tensors
only (`training.wrap_distributed`), an export merges LoRA into the weights (`export.write_onnx`).
"""

import logging

from torch import nn

from ..models.backbones import Weights
from ..models.finetune import (
    FinetuneError,
    adapt_as_recorded,
    adapt_backbone,
    adapted_backbones,
    backbone_identity,
    param_groups,
    read_adaptation_record,
)
from .config import ConfigError

logger = logging.getLogger("dinoseg")


def base_identity(backbone: nn.Module, *, dino_hub: str | None, pretrained_weights: str | None, random_init: bool,
                  random_init_seed: int) -> dict:
    """`models.finetune.backbone_identity` of a backbone built from a config's `model` values (no weights given
    for a hub name: its released LVD1689M file, which is what `build_backbone` loads)."""
    weights = None if random_init else (pretrained_weights or (Weights.LVD1689M.value if dino_hub else None))
    return backbone_identity(backbone, dino_hub, weights, random_init_seed)


def adapt_for_training(backbone: nn.Module, finetune: dict, *, identity, last_read_block: int, seed: int) -> nn.Module:
    """`backbone` adapted as `finetune` (`config.finetune_kwargs` of `model.finetune`) says, for training a head
    that reads blocks up to `last_read_block`; `identity` is a callable giving the base backbone's identity (only
    computed when the backbone is adapted). A value that cannot apply to this backbone is a `ConfigError` naming
    the key. `mode: frozen` returns `backbone` untouched."""
    if finetune["mode"] == "frozen":
        return backbone
    try:
        return adapt_backbone(backbone, **finetune, last_read_block=last_read_block, seed=seed, identity=identity())
    except FinetuneError as e:
        raise ConfigError(str(e)) from None


def adapt_for_head(backbone: nn.Module, head: str, *, identity) -> nn.Module:
    """`backbone` adapted as the head checkpoint `head` records (`model.finetune` of the run that trained it,
    whatever the config says now), after checking that it is the backbone the checkpoint was trained on; a head
    trained on a frozen backbone (or an official or released head file) leaves it untouched. `identity` as for
    `adapt_for_training`."""
    record = read_adaptation_record(head)
    if record is None:
        return backbone
    settings = record["finetune"]
    logger.info("%s: backbone adapted as it was trained (%s)", head,
                ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None))
    return adapt_as_recorded(backbone, record, identity(), source=str(head))


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


__all__ = ["adapt_for_head", "adapt_for_training", "base_identity", "optimizer_groups"]
