"""Frozen backbones: the marker that keeps them in eval mode during training and out of head checkpoints."""

import torch
from torch import nn

FROZEN_BACKBONE = "_dinoseg_frozen_backbone"


def freeze_backbone(module: nn.Module) -> nn.Module:
    """Freeze a backbone (no gradients, eval mode) and mark it, so that checkpoints leave it out and training
    keeps it in eval mode."""
    module.requires_grad_(False)
    module.eval()
    setattr(module, FROZEN_BACKBONE, True)
    return module


def frozen_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes of the frozen backbones in `model` (never saved: users have their official files)."""
    return [name + "." for name, module in model.named_modules() if getattr(module, FROZEN_BACKBONE, False)]


def head_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything but the frozen backbone, on the CPU: what a head checkpoint holds."""
    skip = tuple(frozen_prefixes(model))
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(skip)}


def set_train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """`model.train(mode)` with every frozen backbone kept in eval mode."""
    model.train(mode)
    for module in model.modules():
        if getattr(module, FROZEN_BACKBONE, False):
            module.eval()
    return model
