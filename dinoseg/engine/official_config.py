"""Configs written for Meta's official DINOv3 evaluation code, read unchanged.

A config in the official schema is recognised by keys only it has (`bs`, `n_gpus`, `model_dtype`, `num_workers` or
`load_from` at the top level, `scheduler.constructor_kwargs`, plus the task's own markers); an official config without
a `task` key is the task whose official keys it uses (`official_task`: `losses` -> depth). Its layers (files and
command-line overrides, which may use official or dinoseg keys) are merged, completed with the official defaults (a
key the official file leaves out means the official default, not dinoseg's) and translated key by key into one
dinoseg layer, logged once as one block. An official key whose value dinoseg cannot honour (a value that would change
the result) is refused with a `ConfigError` naming it. Keys the official schema does not have pass through as
dinoseg keys; a dinoseg key set together with the official key it translates is an error unless the official value
is a default.

This module holds the keys every official task shares (backbone, batch, workers, seed, precision, optimizer,
schedule, output directory, datasets); a task adds its own in an `OfficialSchema`.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .config import ConfigError
from .schedulers import ONE_CYCLE_DEFAULTS, AnnealStrategy, SchedulerType

logger = logging.getLogger("dinoseg")

REQUIRED = "???"  # a value the user must give (as in dinoseg's own configs)
_ABSENT = object()

# Top-level keys only the official schemas have (every task's).
SHARED_MARKERS = ("bs", "n_gpus", "model_dtype", "num_workers", "load_from")
# Official `ModelDtype` names -> dinoseg `precision` values (None: no autocast, the official depth default).
_PRECISIONS = {"FLOAT32": "float32", "BFLOAT16": "bfloat16", None: "float32"}
# Official `WarmupOneCycleLR` constructor keys that change nothing with dinoseg's AdamW (or anywhere officially).
_NO_EFFECT_SCHEDULE_KEYS = {
    "pct_start": "it is not used by the official schedule",
    "update_momentum": "AdamW has no `momentum`",
    "max_lr": "the official build_scheduler replaces it with optimizer.lr",
    "total_steps": "the official build_scheduler replaces it with scheduler.total_iter",
}


@dataclass
class OfficialSchema:
    """A task's part of the official schema: its marker keys (top-level keys of the official schema that dinoseg's
    configs do not have), its official defaults (dotted official key -> value; the shared keys' defaults too, as they
    differ between tasks), `translate(config)` for its own keys, and `own_keys`: dotted official keys that no other
    task's official schema has, which tell an official config without `task` to be this task's."""

    markers: tuple[str, ...]
    defaults: dict[str, Any]
    translate: Callable[["OfficialConfig"], None]
    source: str = field(default="official DINOv3 config")
    own_keys: tuple[str, ...] = ()


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value and key != "constructor_kwargs":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class OfficialConfig:
    """An official config being translated. `take(key)` consumes an official value (the config's, else the
    official default); `put(key, value, official)` sets a dinoseg value and records the translation; `note`
    records an official key that needs none; `refuse` raises. What is never taken is passed through as dinoseg's."""

    def __init__(self, merged: dict, defaults: dict[str, Any]):
        self.values = _flatten(merged)
        self.defaults = defaults
        self.given: set[str] = set()  # official keys the config gave (not defaults)
        self.out: dict[str, tuple[Any, str | None]] = {}  # dinoseg key -> (value, the official key(s) that gave it)
        self.lines: list[str] = []

    def peek(self, key: str, default=None):
        """An official value without consuming it (the config's, else the official default, else `default`)."""
        return self.values.get(key, self.defaults.get(key, default))

    def take(self, key: str, default=_ABSENT):
        """Consume official `key`: the config's value, else the official default (else `default`)."""
        if key in self.values:
            self.given.add(key)
            return self.values.pop(key)
        if key in self.defaults:
            return self.defaults[key]
        if default is _ABSENT:
            raise KeyError(key)
        return default

    def put(self, key: str, value, official: str, explicit: bool | None = None, note: str = "") -> None:
        """Set dinoseg `key` from official key(s) `official` ("a x b" for several); `explicit`: whether the config
        gave them (default: looked up)."""
        if explicit is None:
            explicit = any(k in self.given for k in official.split(" x "))
        self.out[key] = (value, official if explicit else None)
        origin = "" if explicit else " (official default)"
        self.lines.append(f"  {official} -> {key}={value!r}{origin}" + (f": {note}" if note else ""))

    def note(self, official: str, value, text: str) -> None:
        self.lines.append(f"  {official}={value!r}: {text}")

    def refuse(self, official: str, value, why: str):
        raise ConfigError(f"{official}={value!r}: {why} (official DINOv3 config key)")


def is_official(layers: list[DictConfig], markers: tuple[str, ...]) -> bool:
    """Whether any layer uses a key only the official schema has."""
    for layer in layers:
        if any(k in layer for k in markers):
            return True
        scheduler = layer.get("scheduler")
        if isinstance(scheduler, DictConfig) and "constructor_kwargs" in scheduler:
            return True
    return False


def _uses(layers: list[DictConfig], keys: tuple[str, ...]) -> list[str]:
    """Those of the dotted `keys` that some layer sets."""
    return [k for k in keys if any(OmegaConf.select(layer, k, default=_ABSENT) is not _ABSENT for layer in layers)]


def official_task(layers: list[DictConfig], schemas: dict[str, OfficialSchema | None], task: str | None) -> str | None:
    """The task of layers that form an official config: the one whose `own_keys` they use (None: not an official
    config, or no task's own keys). `task`, given by the layers' `task` key, wins; it is an error when the layers use
    only another task's own keys, as is a config using several tasks' own keys without `task`."""
    claims = {name: used for name, schema in schemas.items() if schema is not None
              and is_official(layers, SHARED_MARKERS + schema.markers) and (used := _uses(layers, schema.own_keys))}
    if task is not None:
        if claims and task not in claims:
            other, used = next(iter(claims.items()))
            raise ConfigError(f"task={task!r}: the config is an official {other} config (it has {', '.join(used)}); "
                              f"drop task= (or give task={other})")
        return task
    if len(claims) > 1:
        found = "; ".join(f"{name}: {', '.join(used)}" for name, used in claims.items())
        raise ConfigError(f"the official config mixes keys of several tasks ({found}); give task=<name>")
    return next(iter(claims), None)


def translate_shared(config: OfficialConfig) -> None:
    """The keys every official task has."""
    take = config.take
    _translate_model(config)
    bs, n_gpus = take("bs"), take("n_gpus")
    config.put("train.batch_size", int(bs) * int(n_gpus), "bs x n_gpus",
               note="dinoseg's batch is the total over all processes (run n_gpus processes for the same per-GPU batch)")
    config.put("train.num_workers", int(take("num_workers")), "num_workers")
    config.put("seed", int(take("seed")), "seed")
    dtype = take("model_dtype")
    name = getattr(dtype, "name", dtype)
    name = name.upper() if isinstance(name, str) else name
    if name not in _PRECISIONS:
        config.refuse("model_dtype", dtype, f"expected one of {[k for k in _PRECISIONS if k]}")
    config.put("precision", _PRECISIONS[name], "model_dtype")
    for key in ("lr", "beta1", "beta2", "weight_decay"):
        config.put(f"optimizer.{key}", float(take(f"optimizer.{key}")), f"optimizer.{key}")
    clip = float(take("optimizer.gradient_clip"))
    if clip <= 0:
        config.refuse("optimizer.gradient_clip", clip, "officially the gradient norm is clipped to it, which zeroes (or "
                      "reverses) every gradient; dinoseg's 0 means no clipping: give inf for none")
    config.put("optimizer.gradient_clip", clip, "optimizer.gradient_clip", note="no clipping" if math.isinf(clip) else "")
    _translate_scheduler(config)
    output_dir = take("output_dir", None)
    if output_dir:
        config.put("output_dir", str(output_dir), "output_dir")
    root = take("datasets.root", "")
    config.put("datasets.root", root if root else REQUIRED, "datasets.root",
               note="" if root else "required (the official file leaves it empty)")
    for split in ("train", "val"):
        if config.peek(f"datasets.{split}") is not None:
            config.put(f"datasets.{split}", str(take(f"datasets.{split}")), f"datasets.{split}")


def _translate_model(config: OfficialConfig) -> None:
    take = config.take
    config_file = take("model.config_file", None)
    if config_file:
        config.refuse("model.config_file", config_file, "dinoseg builds backbones by hub name: give "
                      "model.dino_hub=<name> and model.pretrained_weights=<checkpoint> instead")
    hub, weights = take("model.dino_hub", None), take("model.pretrained_weights", None)
    random_init = bool(config.peek("model.random_init", False))  # dinoseg's key: random weights, asked for
    if hub is not None or "model.dino_hub" in config.given:
        config.put("model.dino_hub", hub, "model.dino_hub")
        if hub is not None and weights is None and not random_init:
            # Officially torch.hub loads the name's default weights; dinoseg looks for the same file in the torch hub
            # cache (and downloads nothing).
            config.put("model.pretrained_weights", "LVD1689M", "model.dino_hub", explicit=False,
                       note="the hub name's default weights, from the torch hub cache")
    if weights is not None or "model.pretrained_weights" in config.given:
        config.put("model.pretrained_weights", weights, "model.pretrained_weights")
    given = {"model.dino_hub", "model.pretrained_weights"} & config.given
    if not given and not any(k.startswith("model.backbone_kwargs") for k in config.values):
        # The official code needs a backbone too; dinoseg's default would be a random ViT-S.
        config.put("model.dino_hub", REQUIRED, "model", explicit=False, note="required (no backbone given)")
        if not random_init:
            config.put("model.pretrained_weights", REQUIRED, "model", explicit=False, note="required (no backbone given)")


def _translate_scheduler(config: OfficialConfig) -> None:
    take = config.take
    kind = take("scheduler.type")
    config.put("scheduler.total_iter", int(take("scheduler.total_iter")), "scheduler.total_iter")
    kwargs = dict(take("scheduler.constructor_kwargs", None) or {})
    if kind != SchedulerType.WarmupOneCycleLR.value:
        if kind in [t.value for t in SchedulerType] and not kwargs:  # dinoseg's own schedules, given by a dinoseg user
            config.put("scheduler.type", kind, "scheduler.type")
            return
        config.refuse("scheduler.type", kind, "dinoseg implements the official WarmupOneCycleLR (and its own poly / "
                      "constant); the other official types are not supported")
    config.put("scheduler.type", kind, "scheduler.type")
    given = set(kwargs)
    kwargs = {**ONE_CYCLE_DEFAULTS, **kwargs}
    last_epoch = kwargs.pop("last_epoch", -1)
    if last_epoch != -1:
        config.refuse("scheduler.constructor_kwargs.last_epoch", last_epoch, "dinoseg resumes from its checkpoints")
    for key, why in _NO_EFFECT_SCHEDULE_KEYS.items():
        if key in kwargs:
            value = kwargs.pop(key)
            if key in given:
                config.note(f"scheduler.constructor_kwargs.{key}", value, f"no effect ({why})")
    strategy = kwargs.pop("anneal_strategy")
    if strategy not in [s.value for s in AnnealStrategy]:
        config.refuse("scheduler.constructor_kwargs.anneal_strategy", strategy, "expected 'cos' or 'linear'")
    kwargs["anneal_strategy"] = strategy
    for key in ("warmup_iters", "warmup_ratio", "div_factor", "final_div_factor", "anneal_strategy", "use_beta1",
                "base_momentum", "max_momentum"):
        value = kwargs.pop(key)
        value = value if key in ("anneal_strategy", "use_beta1") else (int(value) if key == "warmup_iters" else float(value))
        config.put(f"scheduler.{key}", value, f"scheduler.constructor_kwargs.{key}", explicit=key in given)
    for key, value in kwargs.items():  # the official build_scheduler drops what its constructor does not take
        config.note(f"scheduler.constructor_kwargs.{key}", value, "ignored (not a WarmupOneCycleLR argument, dropped "
                    "by the official build_scheduler too)")


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def translate_layers(layers: list[DictConfig], schema: OfficialSchema | None) -> list[DictConfig]:
    """`layers` unchanged when they are not an official config (or the task has no official schema), else the one
    dinoseg layer they translate to (see the module docstring)."""
    if schema is None or not is_official(layers, SHARED_MARKERS + schema.markers):
        return layers
    merged = OmegaConf.to_container(OmegaConf.merge(*layers), resolve=False)
    config = OfficialConfig(merged, schema.defaults)
    translate_shared(config)
    schema.translate(config)
    rest = dict(config.values)  # not official keys: dinoseg's own
    for key, value in rest.items():
        if key in config.out:
            if config.out[key][1]:
                raise ConfigError(f"{key}={value!r}: set together with the official {config.out[key][1]}, which it "
                                  "translates to; give one")
            config.lines.append(f"  {key}={value!r} (dinoseg key) replaces the official default")
    flat = {key: value for key, (value, _) in config.out.items()}
    flat.update(rest)
    logger.info("%s, translated to dinoseg keys:\n%s", schema.source, "\n".join(config.lines))
    return [OmegaConf.create(_nest(flat))]
