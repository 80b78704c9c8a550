"""Typed run configurations shared by every task: loading (defaults < YAML files < `key=value` overrides, every key
checked against the task's dataclass schema), the sections every task has, and saving.

`load_config(schema, yaml_paths, overrides)` = `OmegaConf.merge(OmegaConf.structured(schema), *yamls, cli)`;
OmegaConf rejects unknown keys and wrong types, and its errors become one line naming the key.
"""

import inspect
import logging
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..models.checkpoint import first_line
from .schedulers import AnnealStrategy, SchedulerType


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the value at fault."""


class Precision(Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"  # autocast on CPU and CUDA
    FLOAT16 = "float16"  # autocast + gradient scaler, CUDA only

    @property
    def dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.value]


class FinetuneMode(Enum):
    """`model.finetune.mode`: what of the backbone trains with the head."""

    FROZEN = "frozen"  # nothing: the official protocol
    LORA = "lora"  # low-rank adapters on the linear layers of its blocks
    BLOCKS = "blocks"  # its last blocks (ConvNeXt: stages)


@dataclass
class FinetuneConfig:
    """Backbone adaptation (README "Backbone adaptation"); every task reads it the same way."""

    mode: FinetuneMode = FinetuneMode.FROZEN
    lora_rank: int = 8  # lora: rank of the adapters (the update is lora_alpha / lora_rank x B A)
    lora_alpha: float = 16.0
    # lora: names of the linear layers of the blocks to adapt (ViT: qkv, proj, fc1, fc2, or w1, w2, w3 for SwiGLU;
    # ConvNeXt: pwconv1, pwconv2); null: the architecture's default, [qkv, proj] on a ViT, [pwconv1, pwconv2] on a
    # ConvNeXt.
    lora_targets: list[str] | None = None
    blocks: int = 2  # blocks: the last N blocks the head reads (ConvNeXt: stages) train
    lr_multiplier: float = 0.1  # learning rate of the adapted tensors relative to the head's
    layer_decay: float = 1.0  # layer-wise lr decay: block i of n trains at lr_multiplier x layer_decay ** (n - i)
    gradient_checkpointing: bool = False  # recompute the trained blocks' activations in the backward pass


def finetune_kwargs(section) -> dict:
    """The keywords of `models.finetune.adapt_backbone` held by a `FinetuneConfig` section."""
    targets = section.lora_targets
    return {"mode": FinetuneMode(section.mode).value, "rank": section.lora_rank, "alpha": float(section.lora_alpha),
            "targets": None if targets is None else [str(t) for t in targets], "blocks": section.blocks,
            "gradient_checkpointing": bool(section.gradient_checkpointing)}


@dataclass
class ModelConfig:
    """The backbone: frozen, or adapted as `finetune` says."""

    # A hub name (dinov3_vits16 ... dinov3_vit7b16, dinov3_convnext_tiny ... _large) or None to build a ViT from
    # `backbone_kwargs`; a custom ConvNeXt is a dinov3_convnext_* name with `depths` / `dims` overrides.
    dino_hub: str | None = "dinov3_vits16"
    # Official .pth, Hugging Face directory/safetensors, file:// or https:// URL, or an official weight-set name
    # (LVD1689M, SAT493M: the released file in the torch hub cache). None: a hub name's LVD1689M weights from the
    # torch hub cache; missing there (or for a custom architecture) is an error, unless random_init.
    pretrained_weights: str | None = None
    # Constructor keywords: override the hub architecture, or the whole architecture when dino_hub is None.
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    # Random backbone weights, drawn from random_init_seed: only when asked (demos, tests); refused with weights.
    random_init: bool = False
    # Seed of the random backbone weights (so eval/predict rebuild the same ones).
    random_init_seed: int = 0
    # Storage dtype of the frozen backbone (and, in eval / predict, of the head): bfloat16 / float16 halve its memory;
    # normalisations and RoPE periods stay float32, and the forward runs under autocast in that dtype.
    weights_dtype: Precision = Precision.FLOAT32
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 1e-3
    gradient_clip: float = 35.0  # max gradient norm; 0 disables clipping


@dataclass
class SchedulerConfig:
    type: SchedulerType = SchedulerType.WarmupOneCycleLR
    total_iter: int = 40_000
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6  # learning-rate factor at the first warmup step
    final_div_factor: float = float("inf")  # one-cycle: final lr = lr / div_factor / final_div_factor
    div_factor: float = 25.0
    anneal_strategy: AnnealStrategy = AnnealStrategy.COS  # one-cycle: cosine or linear decay after the warmup
    # One-cycle: Adam's beta1 follows the official momentum schedule (0 during the warmup, then base_momentum ->
    # max_momentum) instead of optimizer.beta1.
    use_beta1: bool = False
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    poly_power: float = 0.9
    min_lr: float = 0.0  # poly only
    # step only: iterations from which the lr is multiplied by `gamma` once more (Plain-DETR's `lr_drop` epoch E is
    # the milestone E x iterations per epoch)
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1


def scheduler_kwargs(section) -> dict:
    """The `constructor_kwargs` of `build_scheduler` held by a `SchedulerConfig` section (a task's subclass of it
    may add keywords, e.g. depth's beta1 cycle)."""
    return {key: section[key] for key in section if key not in ("type", "total_iter")}


class Resume(Enum):
    """`train.resume`: what a run does with the run already in its output directory (YAML `true` / `false` work)."""

    FALSE = "false"  # start a new run; a directory holding one is refused (or replaced: overwrite_output_dir)
    TRUE = "true"  # continue from <output_dir>/checkpoint_last.pth; an error without it
    AUTO = "auto"  # continue from checkpoint_last.pth when there is one, else start a new run (preemptible jobs)


@dataclass
class TrainConfig:
    """What every task's training loop reads; tasks add their loss settings in a subclass."""

    batch_size: int = 16  # images per iteration, summed over all processes
    num_workers: int = 4  # data-loading workers per process
    checkpoint_interval: int = 1000
    log_interval: int = 50
    resume: Resume = Resume.FALSE
    tensorboard: bool = False
    # Deterministic algorithms on CUDA (cuBLAS, cuDNN, and dinoseg's own replacements for the ops that have none),
    # so that a run, and a killed and resumed run, give the same weights; slower. CPU runs are deterministic anyway.
    deterministic: bool = False


# Keys of the shared sections that a resumed run may change: they touch bookkeeping, not the model, the data or
# the optimisation (tasks add their own). Extending `scheduler.total_iter` is allowed; shrinking it below the
# checkpoint's iteration is an error.
BOOKKEEPING_KEYS = (
    "train.resume", "train.log_interval", "train.checkpoint_interval", "train.tensorboard", "train.num_workers",
    "eval.eval_interval", "scheduler.total_iter", "device", "head", "output_dir", "overwrite_output_dir",
)


def config_dir() -> Path:
    """The configs shipped inside the package (found by bare name: `dinoseg train demo.yaml`)."""
    return Path(str(resources.files("dinoseg") / "configs"))


def find_config_file(path: str | Path) -> Path:
    """`path` as given, else a shipped config of that name (`demo.yaml`, `configs/demo.yaml`)."""
    path = Path(path)
    if path.exists():
        return path
    shipped = config_dir() / path.name
    if shipped.exists():
        return shipped
    raise ConfigError(f"{path}: config file not found")


def read_yaml(path: str | Path) -> DictConfig:
    """One YAML layer; anything but a mapping at the top level is an error naming the file."""
    path = find_config_file(path)
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
        layer = OmegaConf.create(text) if data is not None else OmegaConf.create({})
    except Exception as e:
        raise ConfigError(f"{path}: not valid YAML ({first_line(e)})") from None
    if not isinstance(data, dict | None) or not isinstance(layer, DictConfig):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise ConfigError(f"{path}: the top level must be a mapping of keys, found {kind}")
    return layer


def parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            OmegaConf.from_dotlist([item])
        except Exception as e:  # any YAML error in the value
            raise ConfigError(f"override {item!r}: value is not valid YAML ({first_line(e)})") from None
    return OmegaConf.from_dotlist(list(overrides))


def _one_line(err: OmegaConfBaseException) -> str:
    msg = first_line(err)
    key = getattr(err, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def _leaf_keys(node, prefix: str = "") -> dict[str, bool]:
    """Dotted leaf keys of a config -> whether each is `???`."""
    out = {}
    for key in node:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            out[full] = True
        elif isinstance(node[key], DictConfig):
            out.update(_leaf_keys(node[key], full + "."))
        else:
            out[full] = False
    return out


def _enum_type(annotation) -> type[Enum] | None:
    """The Enum class of a field annotated `E` or `E | None`."""
    candidates = typing.get_args(annotation) or (annotation,)
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, Enum)), None)


def _normalize_enums(schema: type, layer: DictConfig, prefix: str = "") -> None:
    """Enum values in `layer` written as the member's value or name, in any case ("slide", "SLIDE", "Slide"),
    become the member's name, which every supported OmegaConf version accepts; anything else is an error
    listing the values."""
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        if f.name not in layer or OmegaConf.is_missing(layer, f.name):
            continue
        value, annotation = layer[f.name], hints[f.name]
        enum = _enum_type(annotation)
        if enum is not None and isinstance(value, bool):  # `resume: true` names the member of value "true"
            value = str(value).lower()
        if enum is not None and isinstance(value, str):
            match = [m for m in enum if value.lower() in (str(m.value).lower(), m.name.lower())]
            if not match:
                fail(prefix + f.name, value, f"expected one of {[m.value for m in enum]}")
            layer[f.name] = match[0].name
        elif is_dataclass(annotation) and isinstance(value, DictConfig):
            _normalize_enums(annotation, value, prefix + f.name + ".")


def merge_layers(schema: type, layers: list[DictConfig], require: tuple[str, ...] = ("",)) -> DictConfig:
    """Defaults of `schema` < `layers` (in order); every key checked. `require`: key prefixes whose `???` values
    must be given (a YAML marks a value the user must give with `???`; merging would keep the default)."""
    for layer in layers:
        _normalize_enums(schema, layer)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), *layers)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    required: set[str] = set()
    for layer in layers:
        keys = _leaf_keys(layer)
        required = (required - {k for k, missing in keys.items() if not missing}) | {
            k for k, missing in keys.items() if missing}
    required = {k for k in required if k.startswith(tuple(require))}
    if required:
        key = sorted(required)[0]
        raise ConfigError(f"{key}: required value missing (add {key}=... to the command line)")
    return cfg


def read_layers(yaml_paths=(), overrides=()) -> list[DictConfig]:
    """The YAML files (in order) then the `key=value` overrides, each as one layer."""
    return [*(read_yaml(p) for p in yaml_paths), parse_overrides(list(overrides))]


def layer_value(layers: list[DictConfig], key: str, default=None):
    """The value the last layer that sets top-level `key` gives it (before merging, e.g. to pick the task)."""
    for layer in reversed(layers):
        if key in layer:
            return layer[key]
    return default


def is_given(layers: list[DictConfig], key: str) -> bool:
    """Whether a YAML file or override sets the dotted `key` (rather than leaving it to the schema's default)."""
    return any(OmegaConf.select(layer, key, default=_ABSENT) is not _ABSENT for layer in layers)


_ABSENT = object()


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    path = Path(path)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def fail(key: str, value, why: str):
    raise ConfigError(f"{key}={value!r}: {why}")


# Range rules: (test, what the value must be). None always passes: the schema decides which keys may be None.
POSITIVE = (lambda v: v > 0, "must be positive")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
FRACTION = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
OPEN_FRACTION = (lambda v: 0 <= v < 1, "must be in [0, 1)")


def check_ranges(cfg: DictConfig, rules: dict[str, tuple]) -> None:
    """`rules`: dotted key -> (test, description); None passes when the key's schema type is optional."""
    for key, (test, why) in rules.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if isinstance(value, float) and math.isnan(value) or not test(value):
            fail(key, value, why)


def validate_device(name: str | None) -> None:
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        fail("device", name, "expected a torch device such as 'cpu', 'cuda' or 'cuda:1'")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("device", name, "CUDA is not available on this machine")


def _constructor_args(cls: type) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "device")}


def _check_backbone_kwargs(model: DictConfig, *, convnext: bool) -> None:
    """`model.backbone_kwargs` names arguments of the backbone's constructor. Arguments of the other backbone family
    (a ViT config such as demo_m2f.yaml with `model.dino_hub=dinov3_convnext_tiny`) cannot apply: they are dropped
    with one warning naming them (a command line cannot remove a YAML's keys); any other name is an error."""
    from ..models.convnext import ConvNeXt
    from ..models.vision_transformer import DinoVisionTransformer

    own, other = (ConvNeXt, DinoVisionTransformer) if convnext else (DinoVisionTransformer, ConvNeXt)
    accepted, foreign = _constructor_args(own), _constructor_args(other)
    ignored = []
    for key in list(model.backbone_kwargs):
        if key in accepted:
            continue
        if key not in foreign:
            fail(f"model.backbone_kwargs.{key}", model.backbone_kwargs[key],
                 f"not an argument of {own.__name__} (expected one of {sorted(accepted)})")
        ignored.append(f"model.backbone_kwargs.{key}={model.backbone_kwargs[key]!r}")
        del model.backbone_kwargs[key]
    if ignored:
        logging.getLogger("dinoseg").warning("%s: ignored, arguments of %s that a %s backbone does not take",
                                             ", ".join(ignored), other.__name__, own.__name__)


def validate_common(cfg: DictConfig) -> None:
    """Range checks of the sections every task shares (tasks check their own sections)."""
    from ..models.backbones import ARCHS, CONVNEXT_ARCHS

    m = cfg.model
    if m.dino_hub is None and not m.backbone_kwargs:
        fail("model.dino_hub", None, "give a hub name or model.backbone_kwargs")
    if m.random_init and m.pretrained_weights:
        raise ConfigError(f"model.random_init=true asks for random backbone weights, model.pretrained_weights="
                          f"{m.pretrained_weights!r} for these: choose one")
    if m.dino_hub is not None and m.dino_hub not in ARCHS and m.dino_hub not in CONVNEXT_ARCHS:
        fail("model.dino_hub", m.dino_hub, f"expected one of {sorted(ARCHS) + sorted(CONVNEXT_ARCHS)}")
    _check_backbone_kwargs(m, convnext=m.dino_hub in CONVNEXT_ARCHS)
    total = cfg.scheduler.total_iter
    check_ranges(cfg, {
        "model.random_init_seed": NON_NEGATIVE, "seed": NON_NEGATIVE,
        "model.finetune.lora_rank": (lambda v: v >= 1, "must be >= 1"),
        "model.finetune.lora_alpha": (lambda v: v > 0 and math.isfinite(v), "must be a finite number > 0"),
        "model.finetune.lora_targets": (lambda v: len(v) > 0 and len(set(v)) == len(v),
                                        "expected a non-empty list of layer names, each once (or null: the "
                                        "architecture's default)"),
        "model.finetune.blocks": (lambda v: v >= 1, "must be >= 1"),
        "model.finetune.lr_multiplier": (lambda v: v > 0 and math.isfinite(v), "must be a finite number > 0"),
        "model.finetune.layer_decay": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
        "optimizer.lr": POSITIVE, "optimizer.beta1": OPEN_FRACTION, "optimizer.beta2": OPEN_FRACTION,
        "optimizer.weight_decay": NON_NEGATIVE, "optimizer.gradient_clip": (lambda v: v >= 0, "must be >= 0 (0: no clipping)"),
        "scheduler.total_iter": POSITIVE,
        "scheduler.warmup_iters": (lambda v: 0 <= v < total, f"must be in [0, scheduler.total_iter={total})"),
        "scheduler.warmup_ratio": FRACTION, "scheduler.final_div_factor": POSITIVE, "scheduler.div_factor": POSITIVE,
        "scheduler.poly_power": NON_NEGATIVE, "scheduler.min_lr": NON_NEGATIVE,
        "scheduler.milestones": (lambda v: all(0 < m < total for m in v) and list(v) == sorted(set(v)),
                                 f"expected increasing iterations in [1, scheduler.total_iter={total})"),
        "scheduler.gamma": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
        "train.batch_size": POSITIVE, "train.num_workers": NON_NEGATIVE, "train.checkpoint_interval": POSITIVE,
        "train.log_interval": POSITIVE,
    })
    validate_device(cfg.device)
