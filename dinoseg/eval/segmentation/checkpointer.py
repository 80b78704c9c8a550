"""Head-only checkpoints, written atomically by rank 0, with everything needed for an exact resume."""

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ... import distributed
from ...hub.checkpoint import CheckpointError, load_state_dict_file
from ..utils import FROZEN_BACKBONE

LAST = "checkpoint_last.pth"
BEST = "checkpoint_best.pth"


def frozen_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes of the frozen backbone (never saved: users have its official checkpoint)."""
    return [name + "." for name, module in model.named_modules() if getattr(module, FROZEN_BACKBONE, False)]


def head_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    skip = tuple(frozen_prefixes(model))
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(skip)}


def load_head_state_dict(model: nn.Module, state_dict: dict, source: str, assign: bool = False) -> None:
    """Strict on the head: every head key must be present with its shape, and nothing else (backbone keys
    included: the frozen backbone keeps its own weights). `assign=True` for a head built on the meta device."""
    skip = tuple(frozen_prefixes(model))
    stray = [k for k in state_dict if k.startswith(skip)]
    if stray:
        raise CheckpointError(f"{source}: head checkpoint holds {len(stray)} backbone keys ({', '.join(stray[:3])}); "
                              f"the backbone is loaded from its own checkpoint")
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{len(x)} {t}: {', '.join(x[:5])}" for t, x in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if x]
        raise CheckpointError(f"{source}: head checkpoint does not fit the configured model: {'; '.join(parts)}")
    # The frozen backbone keeps its own weights; the load itself stays strict.
    full = model.state_dict()
    full.update(state_dict)
    model.load_state_dict(full, strict=True, assign=assign)


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(obj):
    """numpy / tuple RNG states -> tensors and lists, so `torch.load(weights_only=True)` can read them back."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, tuple):
        return [_to_plain(o) for o in obj]
    if isinstance(obj, list):
        return [_to_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _to_numpy(obj):
    """Tensors -> numpy arrays: all_gather_object cannot ship tensors inside Python objects on every backend."""
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    return obj


def _from_plain_rng(state: dict) -> dict:
    numpy_state = state["numpy"]
    py = state["python"]
    return {
        **state,
        "numpy": (numpy_state[0], numpy_state[1].numpy(), *numpy_state[2:]),
        "python": (py[0], tuple(py[1]), py[2]),
    }


def save_checkpoint(path: Path, *, model, optimizer, scheduler, scaler, iteration: int, best: dict, config_yaml: str,
                    extra: dict | None = None) -> None:
    """Collective (every rank must call it: RNG states are gathered); rank 0 writes `path` atomically."""
    states = distributed.all_gather_object(_to_numpy(rng_state()))
    if not distributed.is_main_process():
        return
    payload = {
        "model": head_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "iteration": iteration,
        "best": best,
        "rng": _to_plain(states),
        "config": config_yaml,
        **(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable dinoseg checkpoint ({str(e).splitlines()[0]})") from None


def restore_rng(checkpoint: dict) -> None:
    states = checkpoint["rng"]
    rank = distributed.get_rank()
    if len(states) != distributed.get_world_size():
        raise CheckpointError(
            f"checkpoint was written by {len(states)} processes; resume with the same number "
            f"(got {distributed.get_world_size()})"
        )
    set_rng_state(_from_plain_rng(states[rank]))


def read_head_weights(path: str) -> dict[str, torch.Tensor]:
    """A head checkpoint for eval/predict: ours ({'model': ...}), the official `model_final.pth` or safetensors."""
    if not Path(path).exists():
        raise CheckpointError(f"{path}: head checkpoint not found")
    return load_state_dict_file(path)
