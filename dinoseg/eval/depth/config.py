"""Typed configuration of a depth run: the engine's shared sections plus the depth ones, with the official
`dinov3.eval.depth.config` field names and defaults wherever the official schema has the key.

`load_config(yaml_paths, overrides)` = `OmegaConf.merge(OmegaConf.structured(DepthConfig), *yamls, cli)`; OmegaConf
rejects unknown keys and wrong types, and every value range is checked when the config loads.

Where the official schema differs: `bs` x `n_gpus` is `train.batch_size` (the total over all processes),
`num_workers` is `train.num_workers`, `model_dtype` is `precision`, `scheduler.constructor_kwargs.*` are
`scheduler.*`, `losses: {TYPE: weight}` is one weight per loss type (`losses.SIGLOSS` ...; a type the official
dict leaves out has weight 0), and `load_from` is `head` (a head to evaluate or predict with).
"""

import inspect
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from ...engine import config as engine_config  # its sections; the depth ones below carry the official defaults
from ...engine.config import (
    FRACTION,
    OPEN_FRACTION,
    POSITIVE,
    ConfigError,
    ModelConfig,
    Precision,
    check_ranges,
    fail,
    merge_layers,
    read_layers,
    validate_common,
)
from ..utils import BackboneLayersSet
from .datasets.datasets_utils import parse_eval_crop
from .loss import LossType
from .metrics import DEPTH_METRICS_NAME
from .models import BINS_STRATEGIES, HEAD_TYPES, NORM_STRATEGIES, DecoderConfig, DPTHead, LinearHead

__all__ = [
    "ConfigError",
    "DatasetsConfig",
    "DecoderConfig",
    "DepthConfig",
    "DepthOptimizerConfig",
    "DepthSchedulerConfig",
    "DepthTrainConfig",
    "EvalConfig",
    "EvalTransformConfig",
    "LossesConfig",
    "ModelConfig",
    "Precision",
    "ResultConfig",
    "ResultExtension",
    "TrainTransformConfig",
    "TransformConfig",
    "config_from_layers",
    "load_config",
    "make_depth_eval_transforms_from_config",
    "make_depth_train_transforms_from_config",
    "validate_config",
]


class ResultExtension(Enum):
    JPG = "jpg"
    PNG = "png"
    PTH = "pth"


@dataclass
class ResultConfig:
    """Visualisations written by an evaluation (official `result_config`)."""

    save_results: bool = False  # <eval dir>/visualizations/results_<index>.<ext>: prediction | ground truth
    extension: ResultExtension = ResultExtension.JPG
    save_resolution: int | None = None  # shorter side of the saved images; None = ground-truth size
    overlay_alpha: float = 1.0  # < 1 blends the colour-mapped depth over the image
    save_separate_files: bool = False  # also save image, prediction and ground truth as separate files


@dataclass
class DatasetsConfig:
    # Official descriptor strings: "NYU:split=TRAIN", "KITTI:split=VAL", "DepthFolder:root=/data/mine:split=train"...
    train: str = "SyntheticDepth:split=TRAIN"
    val: str = "SyntheticDepth:split=VAL"  # validated every eval.eval_interval (no TTA), chooses checkpoint_best.pth
    test: str | None = None  # what `dinoseg eval` and the end of training evaluate (with eval.use_tta); None: val
    root: str | None = None  # appended as ":root=..." when a descriptor has none
    # Training stops before its first step when sampled maps of datasets.train have depth units that look wrong (a
    # median depth below 5 cm or beyond 500 m or the dataset's range, 8-bit maps that cannot hold 1 m); check-data
    # counts them as problems. false: train on them as they are (check-data lists them as warnings).
    check_units: bool = True


@dataclass
class DepthOptimizerConfig(engine_config.OptimizerConfig):
    """AdamW over the head; official depth defaults."""

    lr: float = 1e-4
    weight_decay: float = 0.01


@dataclass
class DepthSchedulerConfig(engine_config.SchedulerConfig):
    """The schedule with the official depth defaults (those of the official `WarmupOneCycleLR`), including its
    beta1 cycle: with `use_beta1`, AdamW's beta1 is 0 for the warmup iterations (the official scheduler leaves its
    momentum at 0 there) and then follows a cosine from `base_momentum` up to `max_momentum`, so `optimizer.beta1`
    is not used. WarmupOneCycleLR only: the other schedules leave beta1 alone."""

    total_iter: int = 38_400
    warmup_iters: int = 0
    warmup_ratio: float = 0.0
    final_div_factor: float = 1000.0
    use_beta1: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95


@dataclass
class DepthTrainConfig(engine_config.TrainConfig):
    """The training loop's settings with the official depth defaults (2 images per GPU x 8 GPUs, 2 workers, a
    checkpoint at every official validation)."""

    batch_size: int = 16
    num_workers: int = 2
    checkpoint_interval: int = 1600


@dataclass
class LossesConfig:
    """Weight of each training loss (official `losses: {SIGLOSS: 1.0, ...}`); losses of weight 0 are not computed."""

    SIGLOSS: float = 1.0  # scale-invariant log loss (warm-up: its first 100 iterations use the mean term only)
    GRADIENT_LOSS: float = 0.0
    GRADIENT_LOG_LOSS: float = 0.0
    L1: float = 0.0


@dataclass
class TrainTransformConfig:
    img_size: Any = None  # int (shorter side) or [H, W]: resize of image and depth; None keeps the size
    random_crop: list[int] | None = None  # [H, W]; config-nyu.yaml: [416, 544]
    brightness_range: list[float] = field(default_factory=lambda: [0.9, 1.1])
    rotation_angle: float = 2.5  # degrees (probability 1/2)
    fixed_crop: str = "FULL"  # FULL | NYU | KITTI_KB, before everything else
    eval_mask: str = "FULL"  # pixels the training loss sees: FULL | NYU_EIGEN | KITTI_GARG | KITTI_EIGEN


@dataclass
class EvalTransformConfig:
    img_size: Any = None  # int (shorter side) or [H, W] of the image; the ground truth keeps its size
    fixed_crop: str = "FULL"
    eval_mask: str = "FULL"  # the evaluated pixels: FULL | NYU_EIGEN | KITTI_GARG | KITTI_EIGEN


@dataclass
class TransformConfig:
    train: TrainTransformConfig = field(default_factory=TrainTransformConfig)
    eval: EvalTransformConfig = field(default_factory=EvalTransformConfig)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_STD))
    normalization_constant: float = 1000.0  # stored depth units per metre; must match the datasets'


@dataclass
class EvalConfig:
    ignored_value: float = 0.0  # ground-truth value of pixels without depth
    align_least_squares: bool = False  # fit scale and shift of each prediction to its ground truth
    min_depth: float = 0.001  # evaluated depth range (metres): ground truth outside is ignored, predictions clamped
    max_depth: float = 10.0
    use_tta: bool = True  # flip test-time augmentation for `dinoseg eval` and the final evaluation
    eval_interval: int = 1600  # iterations between validations
    max_val_samples: int | None = None  # validate on the first N images only
    metric_to_save: str = "rmse"  # chooses checkpoint_best.pth (lower is better, except a1, a2, a3)


@dataclass
class DepthConfig:
    task: str = "depth"
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: DatasetsConfig = field(default_factory=DatasetsConfig)
    decoder_head: DecoderConfig = field(default_factory=DecoderConfig)
    losses: LossesConfig = field(default_factory=LossesConfig)
    optimizer: DepthOptimizerConfig = field(default_factory=DepthOptimizerConfig)
    scheduler: DepthSchedulerConfig = field(default_factory=DepthSchedulerConfig)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    train: DepthTrainConfig = field(default_factory=DepthTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: list[str] = field(default_factory=lambda: ["rmse", "abs_rel", "a1"])  # computed and reported
    result_config: ResultConfig = field(default_factory=ResultConfig)
    output_dir: str = "runs/depth"
    overwrite_output_dir: bool = False  # train into a directory that holds another run, replacing its files
    seed: int = 321
    precision: Precision = Precision.FLOAT32
    device: str | None = None  # None: CUDA when available, else CPU
    head: str | None = None  # head checkpoint for eval / predict, or the released depther "dinov3_vit7b16_dd"


def load_config(yaml_paths=(), overrides=(), require: tuple[str, ...] = ("",)) -> DictConfig:
    """Defaults < YAML files (in order) < `key=value` CLI overrides; every key and value range checked.
    `require`: key prefixes whose `???` values must be given (default: all; `check-data` needs only `datasets.`)."""
    return config_from_layers(read_layers(yaml_paths, overrides), require)


def config_from_layers(layers, require: tuple[str, ...] = ("",)) -> DictConfig:
    cfg = merge_layers(DepthConfig, layers, require)
    validate_config(cfg)
    return cfg


def _is_size(value) -> bool:
    """None, a positive int, or [H, W] of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value > 0
    sizes = list(value) if OmegaConf.is_list(value) or isinstance(value, list | tuple) else None
    return sizes is not None and len(sizes) == 2 and all(isinstance(v, int) and v > 0 for v in sizes)


SIZE = (_is_size, "expected a positive int (shorter side) or [height, width]")


# The names `transforms.FixedCrop` takes (tests/test_startup.py keeps them equal), checked here without importing the
# transforms: they import torchvision, whose import takes a second or more, which checking a config must not wait for.
FIXED_CROPS = ("FULL", "NYU", "KITTI_KB")


def _is_crop(value) -> bool:
    return isinstance(value, str) and value.upper() in FIXED_CROPS


def _is_mask(value) -> bool:
    try:
        parse_eval_crop(value)
    except ValueError:
        return False
    return True


FIXED_CROP = (_is_crop, f"expected one of {', '.join(FIXED_CROPS)}")
EVAL_MASK = (_is_mask, "expected one of FULL, NYU_EIGEN, KITTI_GARG, KITTI_EIGEN")
# Head options set by the config's own keys (the rest of the head's constructor keywords go in head_kwargs).
_MANAGED_HEAD_OPTIONS = {"self", "in_channels", "n_output_channels", "use_batchnorm", "use_cls_token", "readout_type"}


def _validate_decoder(cfg: DictConfig) -> None:
    head = cfg.decoder_head
    check_ranges(cfg, {
        "decoder_head.type": (lambda v: v in HEAD_TYPES, f"expected one of {list(HEAD_TYPES)}"),
        "decoder_head.bins_strategy": (lambda v: v in BINS_STRATEGIES, f"expected one of {list(BINS_STRATEGIES)}"),
        "decoder_head.norm_strategy": (lambda v: v in NORM_STRATEGIES, f"expected one of {list(NORM_STRATEGIES)}"),
        "decoder_head.min_depth": POSITIVE, "decoder_head.n_output_channels": POSITIVE,
        "decoder_head.max_depth": (lambda v: v > head.min_depth, f"must be > decoder_head.min_depth={head.min_depth}"),
    })
    layers = head.backbone_out_layers
    if isinstance(layers, str):
        names = [m.value for m in BackboneLayersSet]
        if layers.upper() not in names:
            fail("decoder_head.backbone_out_layers", layers, f"expected one of {names} or a list of block indices")
        head.backbone_out_layers = layers.upper()  # one spelling, so resumed runs compare equal
    elif isinstance(layers, BackboneLayersSet):
        head.backbone_out_layers = layers.value
    elif not (OmegaConf.is_list(layers) and len(layers) > 0
              and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        fail("decoder_head.backbone_out_layers", layers, "expected LAST, FOUR_LAST, FOUR_EVEN_INTERVALS or a list of "
             "block indices")
    head_cls = LinearHead if head.type == "linear" else DPTHead
    allowed = sorted(set(inspect.signature(head_cls.__init__).parameters) - _MANAGED_HEAD_OPTIONS)
    for key in head.head_kwargs:
        if key not in allowed:
            fail(f"decoder_head.head_kwargs.{key}", head.head_kwargs[key],
                 f"not an option of the {head.type} head; expected some of {allowed}")


def validate_config(cfg: DictConfig) -> None:
    """Value ranges and cross-field checks OmegaConf cannot express, so a bad value fails before anything runs."""
    validate_common(cfg)
    if cfg.task != "depth":
        fail("task", cfg.task, "this is a depth config")
    _validate_decoder(cfg)
    total = cfg.scheduler.total_iter
    check_ranges(cfg, {
        "datasets.train": (bool, "expected a dataset descriptor such as NYU:split=TRAIN"),
        "datasets.val": (bool, "expected a dataset descriptor such as NYU:split=VAL"),
        "datasets.test": (bool, "expected a dataset descriptor, or null to evaluate datasets.val"),
        **{f"losses.{t.name}": (lambda v: math.isfinite(v) and v >= 0, "must be a finite weight >= 0") for t in LossType},
        "scheduler.base_momentum": OPEN_FRACTION, "scheduler.max_momentum": OPEN_FRACTION,
        "transforms.train.img_size": SIZE, "transforms.train.random_crop": SIZE,
        "transforms.train.brightness_range": (lambda v: len(v) == 2 and 0 < v[0] <= v[1],
                                              "expected [low, high] with 0 < low <= high"),
        "transforms.train.rotation_angle": (lambda v: 0 <= v <= 180, "must be in [0, 180] degrees"),
        "transforms.train.fixed_crop": FIXED_CROP, "transforms.train.eval_mask": EVAL_MASK,
        "transforms.eval.img_size": SIZE, "transforms.eval.fixed_crop": FIXED_CROP,
        "transforms.eval.eval_mask": EVAL_MASK,
        "transforms.mean": (lambda v: len(v) == 3, "expected 3 values (RGB)"),
        "transforms.std": (lambda v: len(v) == 3 and all(x > 0 for x in v), "expected 3 positive values (RGB)"),
        "transforms.normalization_constant": (lambda v: v > 1e-6, "must be > 1e-6 (stored depth units per metre)"),
        "eval.ignored_value": (math.isfinite, "must be a finite number"),
        "eval.min_depth": POSITIVE,
        "eval.max_depth": (lambda v: v > cfg.eval.min_depth, f"must be > eval.min_depth={cfg.eval.min_depth}"),
        "eval.eval_interval": (lambda v: 0 < v <= total, f"must be in [1, scheduler.total_iter={total}]"),
        "eval.max_val_samples": POSITIVE,
        "metrics": (lambda v: len(v) > 0 and len(set(v)) == len(v) and set(v) <= set(DEPTH_METRICS_NAME),
                    f"expected distinct names among {DEPTH_METRICS_NAME}"),
        "eval.metric_to_save": (lambda v: v in cfg.metrics, f"must be one of metrics={list(cfg.metrics)}"),
        "result_config.save_resolution": POSITIVE, "result_config.overlay_alpha": FRACTION,
    })
    if not any(cfg.losses[t.name] > 0 for t in LossType):
        fail("losses", OmegaConf.to_container(cfg.losses), "every weight is 0: no loss to train (e.g. losses.SIGLOSS=1.0)")
    if not cfg.scheduler.base_momentum <= cfg.scheduler.max_momentum:
        fail("scheduler.base_momentum", cfg.scheduler.base_momentum,
             f"must be <= scheduler.max_momentum={cfg.scheduler.max_momentum}")


def loss_weights(losses) -> dict[LossType, float]:
    """The `MultiLoss` dictionary of a `losses` section: the losses with a positive weight."""
    return {t: float(losses[t.name]) for t in LossType if losses[t.name] > 0}


def _size(value):
    if value is None or isinstance(value, int):
        return value
    return tuple(int(v) for v in value)


def make_depth_train_transforms_from_config(config: DepthConfig):
    """The training augmentation of `config.transforms` (official name)."""
    from .transforms import make_depth_train_transforms

    train, t = config.transforms.train, config.transforms
    return make_depth_train_transforms(
        img_size=_size(train.img_size),
        normalization_constant=t.normalization_constant,
        random_crop_size=_size(train.random_crop),
        fixed_crop=train.fixed_crop,
        brightness_range=tuple(train.brightness_range),
        rotation_angle=train.rotation_angle,
        mean=tuple(t.mean),
        std=tuple(t.std),
    )


def make_depth_eval_transforms_from_config(config: DepthConfig, split: str = "val"):
    """Evaluation transforms (official name); flip TTA (`eval.use_tta`) only for the "test" split, as the
    official code: validation during training runs without it."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    from .transforms import make_depth_eval_transforms

    t = config.transforms
    return make_depth_eval_transforms(
        img_size=_size(t.eval.img_size),
        normalization_constant=t.normalization_constant,
        fixed_crop=t.eval.fixed_crop,
        tta=bool(config.eval.use_tta) if split == "test" else False,
        mean=tuple(t.mean),
        std=tuple(t.std),
    )

