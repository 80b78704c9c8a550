"""Training checkpoints: the head only (with the adapted tensors of an adapted backbone, and the record of that
backbone), written atomically by rank 0, with everything needed for an exact resume."""

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..models.checkpoint import (
    CheckpointError,
    load_head_state_dict,
    load_state_dict_file,
    read_checkpoint_object,
    read_torch_file,
)
from ..models.finetune import RECORD, adaptation_record, check_adaptation_record
from ..models.frozen import head_state_dict
from . import distributed
from .config import ConfigError, merge_layers
from .files import write_atomically
from .optim import TrainingError, TrainingInterrupted, TrainingPreempted

logger = logging.getLogger("dinoseg")

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
    """Collective (every rank must call it: RNG states are gathered); rank 0 writes `path` atomically and
    durably (temporary file, fsync, rename, fsync of the directory). A full disk or any other write error leaves
    the previous checkpoint intact and no temporary file behind. `step` is the `OptimizerStep` (optimizer,
    scheduler and gradient-scaler states)."""
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
    record = adaptation_record(model)
    if record is not None:  # an adapted backbone: its settings and the identity of its base (frozen: no entry)
        payload[RECORD] = record
    try:
        write_atomically(path, lambda f: torch.save(payload, f))
    except OSError as e:
        kept = "the previous checkpoint is intact" if path.exists() else "no earlier checkpoint"
        raise TrainingError(f"{path}: checkpoint of iteration {iteration} not written ({e.strerror or e}); {kept}") from None


TRAINING_KEYS = ("model", "optimizer", "scheduler", "scaler", "iteration", "best", "rng", "config")


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint written by `save_checkpoint` (to resume from), checked for every part a resume needs."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    checkpoint = read_torch_file(Path(path))
    missing = [k for k in TRAINING_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a dinoseg training checkpoint (no {', '.join(missing)}); cannot resume from it")
    return checkpoint


def peek_iteration(path: Path) -> str:
    """The iteration a checkpoint was written at, for messages ('?' when it cannot be read)."""
    try:
        return str(int(read_torch_file(Path(path))["iteration"]))
    except Exception:
        return "?"


def check_resume(checkpoint: dict, config: DictConfig, schema: type, allowed: tuple[str, ...], source: str) -> list[str]:
    """The resume contract: `config` may differ from the one saved in `checkpoint` only in `allowed` keys (dotted
    prefixes: bookkeeping such as logging and checkpoint intervals). Anything else is refused in one line naming
    each key with both values. Returns the allowed changes, as `key: old -> new`, for the log."""
    saved = _comparable(OmegaConf.create(checkpoint["config"]), schema)
    now = _comparable(config, schema)
    iteration = int(checkpoint["iteration"])
    if now.get("scheduler.total_iter", iteration) < iteration:
        raise ConfigError(f"scheduler.total_iter={now['scheduler.total_iter']}: the run in {source} is already at "
                          f"iteration {iteration}")
    changed = sorted(k for k in saved.keys() | now.keys() if k in now and saved.get(k) != now.get(k))
    refused = [k for k in changed if not k.startswith(allowed)]
    if refused:
        diffs = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in refused)
        raise ConfigError(f"train.resume=true: {source} was trained with another configuration ({diffs}); resume "
                          f"with the same values, or start a new run (another output_dir or overwrite_output_dir=true)")
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed]


def _comparable(config: DictConfig, schema: type) -> dict:
    """Dotted key -> value, with enum spellings normalised through `schema` (a config saved by another dinoseg
    version that does not fit the schema is compared as written)."""
    layer = OmegaConf.create(OmegaConf.to_yaml(config, resolve=True))
    try:
        layer = merge_layers(schema, [layer], require=())
    except ConfigError:
        pass
    return _flatten(OmegaConf.create(OmegaConf.to_yaml(layer, resolve=True)))


def _flatten(node, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, DictConfig):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    return out


def check_world_size(checkpoint: dict) -> None:
    written_by, now = len(checkpoint["rng"]), distributed.get_world_size()
    if written_by != now:
        raise CheckpointError(f"the checkpoint was written by {written_by} processes; resume with the same number "
                              f"(this run has {now})")


def restore_rng(checkpoint: dict) -> None:
    check_world_size(checkpoint)
    set_rng_state(_from_plain_rng(checkpoint["rng"][distributed.get_rank()]))


@dataclass
class Resumed:
    """The checkpoint a training run continues from, read and checked against the run's config (`checkpoint` is
    None for a fresh run); `changes` are the bookkeeping keys the resumed run changed, for the log."""

    checkpoint: dict | None = None
    path: Path | None = None
    changes: list[str] = field(default_factory=list)

    @property
    def iteration(self) -> int:
        return int(self.checkpoint["iteration"]) if self.checkpoint is not None else 0

    @property
    def best(self) -> dict:
        return dict(self.checkpoint["best"]) if self.checkpoint is not None else {}

    def restore(self, model, step) -> int:
        """The head's weights (and adapted tensors) into `model` and the optimizer, schedule and gradient-scaler
        states into `step` (the `OptimizerStep`); returns the iteration the run starts at. Adapted tensors recorded
        for another base backbone than `model`'s are refused (one line)."""
        if self.checkpoint is not None:
            check_adaptation_record(self.checkpoint.get(RECORD), model, str(self.path))
            load_head_state_dict(model, self.checkpoint["model"], source=str(self.path))
            step.load_state_dict(self.checkpoint)
        return self.iteration

    def restore_rng(self) -> None:
        """This process's RNG states, as they were at the checkpoint (call it last, after every set-up step)."""
        if self.checkpoint is not None:
            restore_rng(self.checkpoint)


_UNDONE = "no checkpoint written: the run is undone, and the same command starts it again"


class Checkpoints:
    """A run's `checkpoint_last.pth` and `checkpoint_best.pth`, the best validation scores so far (`best`, saved in
    both), and what is said about them when training stops early. Saving is collective: every rank calls it.

    `run` is the `RunDirectory`: the first `checkpoint_last.pth` of a new run commits it (the run it replaces is
    deleted only then), and `close` undoes a new run that ends without one."""

    def __init__(self, run, *, model, step, config_yaml: str, resumed: Resumed):
        self.run, self.model, self.step, self.config_yaml = run, model, step, config_yaml
        self.out = Path(run.path)
        self.best = resumed.best
        self.saved = resumed.iteration if resumed.checkpoint is not None else None  # iteration of the last one on disk

    def save_last(self, iteration: int) -> None:
        self._save(LAST, iteration)
        if self.saved is None and distributed.is_main_process():
            self.run.commit()
        self.saved = iteration

    def save_best(self, iteration: int, scores: dict) -> None:
        """`scores` are the new best validation scores, reached at `iteration`."""
        self.best = scores | {"iteration": iteration}
        self._save(BEST, iteration)

    def _save(self, name: str, iteration: int) -> None:
        save_checkpoint(self.out / name, model=self.model, step=self.step, iteration=iteration, best=self.best,
                        config_yaml=self.config_yaml)

    def close(self) -> None:
        """Training has ended, finished or not: a new run that wrote no checkpoint_last.pth is undone, so that the
        same command starts it again (a run it was replacing is put back)."""
        if self.saved is not None or not distributed.is_main_process():
            return
        try:
            self.run.undo()
        except OSError as e:  # the error that stopped training is the one to report; this one is logged
            logger.error("%s: the run could not be undone (%s); the next train into it will", self.out, e)

    def stopped(self, reason: str) -> TrainingError:
        """The error that ends training for `reason`, naming the checkpoint it keeps."""
        kept = f"last checkpoint kept: {self.out / LAST}" if self.saved is not None else _UNDONE
        return TrainingError(f"{reason}; training stopped ({kept})")

    def interrupted(self, iteration: int, total: int) -> TrainingInterrupted:
        """Ctrl-C at `iteration` of `total`: the checkpoint to resume from and how."""
        if self.saved is None:
            return TrainingInterrupted(f"interrupted at iteration {iteration} of {total}; {_UNDONE}")
        return TrainingInterrupted(f"interrupted at iteration {iteration} of {total}; last checkpoint: {self.out / LAST} "
                                   f"(iteration {self.saved}); resume with the same command and train.resume=true")

    def preempted(self, iteration: int, total: int) -> TrainingPreempted:
        """SIGTERM: training stopped at `iteration` of `total`, where `save_last` has just written a checkpoint."""
        return TrainingPreempted(f"stopped by SIGTERM at iteration {iteration} of {total}, checkpoint written: "
                                 f"{self.out / LAST}; continue with the same command and train.resume=auto (or true)")


def read_head_weights(path: str, *, task: str | None = None, head_type: str | None = None) -> dict[str, torch.Tensor]:
    """A head checkpoint for eval/predict/export: ours ({'model': ...}), the official `model_final.pth` or
    safetensors. One of ours records its run's config: a head trained for another task or another head type than
    `task` / `head_type` (the config's `decoder_head.type`) is refused in one line naming both."""
    if not Path(path).exists():
        raise CheckpointError(f"{path}: head checkpoint not found")
    origin = head_origin(path) if task is not None else None
    if origin is not None:
        their_task, their_type = origin
        if their_task != task:
            raise CheckpointError(f"{path}: this is a {their_task} head (decoder_head.type={their_type}), not a {task} "
                                  f"head: use it with a {their_task} config (task={their_task})")
        if head_type is not None and their_type is not None and their_type != head_type.lower():
            raise CheckpointError(f"{path}: this is a {their_type} {task} head but the config has decoder_head.type="
                                  f"{head_type}: set decoder_head.type={their_type} (or use the run's own config)")
    return load_state_dict_file(path)


def head_origin(path: str) -> tuple[str, str | None] | None:
    """(task, decoder_head.type) of the run that wrote a dinoseg checkpoint, from the config it carries; None for
    head files without one (official and released heads, safetensors)."""
    obj = read_checkpoint_object(path)
    text = obj.get("config") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        return None
    try:
        config = OmegaConf.create(text)
    except Exception:  # not our config: nothing to tell
        return None
    if not isinstance(config, DictConfig):
        return None
    head_type = OmegaConf.select(config, "decoder_head.type", default=None)
    return str(config.get("task", "segmentation")), None if head_type is None else str(head_type).lower()
