"""Frozen backbones: the marker that keeps them in eval mode during training and out of head checkpoints.

A frozen backbone may be adapted (`dinoseg.models.finetune`): a few of its tensors (LoRA adapters, or the last
blocks) train. Its `Adaptation` record names them; they are saved with the head, get gradients (and are
all-reduced under DDP), and the blocks holding them run in training mode (stochastic depth), while everything
else stays frozen, in eval mode, out of checkpoints and out of DDP. Without a record, a frozen backbone behaves
exactly as it always has.
"""

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

FROZEN_BACKBONE = "_dinoseg_frozen_backbone"
ADAPTATION = "_dinoseg_adaptation"


@dataclass(frozen=True)
class Adaptation:
    """What trains in an adapted backbone (names relative to the backbone)."""

    mode: str  # "lora" or "blocks"
    trainable: tuple[str, ...]  # parameter names: the adapted tensors, what a checkpoint holds
    train_modules: tuple[str, ...]  # the blocks that hold them: in training mode while the model trains
    settings: dict  # the values the backbone was adapted with (rank, alpha, targets, blocks, ...)
    identity: dict | None = None  # the base backbone (`finetune.backbone_identity`), recorded in checkpoints


def freeze_backbone(module: nn.Module) -> nn.Module:
    """Freeze a backbone (no gradients, eval mode) and mark it, so that checkpoints leave it out and training
    keeps it in eval mode. The tensors of an adapted backbone's `Adaptation` keep their gradients."""
    module.requires_grad_(False)
    module.eval()
    setattr(module, FROZEN_BACKBONE, True)
    adaptation = adaptation_of(module)
    if adaptation is not None:
        for name in adaptation.trainable:
            module.get_parameter(name).requires_grad_(True)
    return module


def adaptation_of(module: nn.Module) -> Adaptation | None:
    """The `Adaptation` of an adapted backbone, None for any other module."""
    return getattr(module, ADAPTATION, None)


def _frozen_backbones(model: nn.Module):
    for name, module in model.named_modules():
        if getattr(module, FROZEN_BACKBONE, False):
            yield (name + "." if name else ""), module


def frozen_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes of the frozen backbones in `model` (adapted or not)."""
    return [name + "." for name, module in model.named_modules() if getattr(module, FROZEN_BACKBONE, False)]


def trainable_backbone_names(model: nn.Module) -> set[str]:
    """Names, in `model`, of the tensors that train inside its frozen backbones (empty when none is adapted)."""
    names = set()
    for prefix, backbone in _frozen_backbones(model):
        adaptation = adaptation_of(backbone)
        if adaptation is not None:
            names |= {prefix + n for n in adaptation.trainable}
    return names


def frozen_names(model: nn.Module) -> set[str]:
    """Names, in `model`, of the frozen tensors: those of its frozen backbones, less the ones an adaptation trains.
    Covers state-dict keys and parameter / buffer names (non-persistent buffers and shared tensors included):
    what checkpoints leave out and DDP ignores."""
    names = set()
    for prefix, backbone in _frozen_backbones(model):
        own = set(backbone.state_dict(keep_vars=True))
        own |= {n for n, _ in backbone.named_parameters(remove_duplicate=False)}
        own |= {n for n, _ in backbone.named_buffers(remove_duplicate=False)}
        adaptation = adaptation_of(backbone)
        if adaptation is not None:
            own -= set(adaptation.trainable)
        names |= {prefix + n for n in own}
    return names


def head_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything but the frozen backbone weights, on the CPU: what a head checkpoint holds (the head, and the
    adapted tensors of an adapted backbone)."""
    frozen = frozen_names(model)
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}


def set_backbone_mode(backbone: nn.Module, training: bool) -> nn.Module:
    """Eval mode for a frozen backbone; when `training`, the blocks an adaptation trains go to training mode."""
    backbone.eval()
    adaptation = adaptation_of(backbone)
    if training and adaptation is not None:
        for name in adaptation.train_modules:
            backbone.get_submodule(name).train()
    return backbone


def set_train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """`model.train(mode)` with every frozen backbone kept in eval mode (but for the blocks that train)."""
    model.train(mode)
    for _, module in _frozen_backbones(model):
        set_backbone_mode(module, mode)
    return model


def backbone_trains(backbone: nn.Module) -> bool:
    """Whether gradients must flow through `backbone` (it holds tensors that train); a frozen one runs without
    an autograd graph."""
    return any(p.requires_grad for p in backbone.parameters())


def backbone_grad_mode(backbone: nn.Module):
    """The context a wrapper runs `backbone` in: `torch.no_grad()` for a frozen one (no autograd graph), none for
    one that holds tensors that train."""
    return contextlib.nullcontext() if backbone_trains(backbone) else torch.no_grad()
