"""Training checkpoints: the head only, written atomically by rank 0, with everything needed for an exact resume."""

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..models.checkpoint import CheckpointError, load_state_dict_file
from ..models.frozen import head_state_dict
from . import distributed

LAST = "checkpoint_last.pth"
BEST = "checkpoint_best.pth"


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
    if isinstance(obj, np.ndarray):  # numpy's uint32 key as int64: torch 2.5 cannot save uint32 tensors
        return torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
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
        "numpy": (numpy_state[0], numpy_state[1].numpy().astype(np.uint32), *numpy_state[2:]),
        "python": (py[0], tuple(py[1]), py[2]),
    }


def save_checkpoint(path: Path, *, model, step, iteration: int, best: dict, config_yaml: str) -> None:
    """Collective (every rank must call it: RNG states are gathered); rank 0 writes `path` atomically.
    `step` is the `OptimizerStep` (optimizer, scheduler and gradient-scaler states)."""
    states = distributed.all_gather_object(_to_numpy(rng_state()))
    if not distributed.is_main_process():
        return
    payload = {
        "model": head_state_dict(model),
        **step.state_dict(),
        "iteration": iteration,
        "best": best,
        "rng": _to_plain(states),
        "config": config_yaml,
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
