"""Typed configuration of a segmentation run: the engine's shared sections plus the segmentation ones.

`load_config(yaml_paths, overrides)` = `OmegaConf.merge(OmegaConf.structured(SegmentationConfig), *yamls, cli)`;
OmegaConf rejects unknown keys and wrong types, and every value range is checked when the config loads.
"""

from dataclasses import dataclass, field

from omegaconf import DictConfig

from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from ...engine.config import (
    ConfigError,
    ModelConfig,
    OptimizerConfig,
    Precision,
    SchedulerConfig,
    TrainConfig,
    fail,
    merge_layers,
    read_layers,
    validate_common,
)
from ...engine.schedulers import SchedulerType
from ..utils import BackboneLayersSet
from .inference import InferenceMode
from .metrics import SUMMARY_NAMES
from .models import DecoderType, Mask2FormerOptions

__all__ = ["ConfigError", "InferenceMode", "Precision", "SchedulerType", "SegmentationConfig", "load_config"]


@dataclass
class DatasetConfig:
    # Official descriptor strings, e.g. "ADE20K:split=TRAIN", "Synthetic:split=VAL:num_samples=32".
    train: str = "Synthetic:split=TRAIN"
    val: str = "Synthetic:split=VAL"
    root: str | None = None  # appended as ":root=..." when a descriptor has none


@dataclass
class DecoderConfig:
    type: DecoderType = DecoderType.LINEAR
    backbone_out_layers: BackboneLayersSet = BackboneLayersSet.LAST
    use_batchnorm: bool = True
    use_cls_token: bool = False
    num_classes: int | None = None  # None: from the head checkpoint (eval, predict) or the training dataset
    hidden_dim: int = 2048  # Mask2Former only
    dropout: float = 0.1  # linear head, training only
    m2f: Mask2FormerOptions = field(default_factory=Mask2FormerOptions)


@dataclass
class TrainTransformConfig:
    img_size: int = 512  # short side before the random ratio
    random_img_size_ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    crop_size: int = 512
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric_distortion: bool = True
    # Hue shift range in turns of the colour circle: mmseg's (-0.1, 0.1) = +-36 degrees; the official recipe's
    # (-0.5, 0.5) reaches any hue (set by the shipped official-recipe configs).
    hue_range: list[float] = field(default_factory=lambda: [-0.1, 0.1])


@dataclass
class EvalTransformConfig:
    img_size: int | None = 512  # short side; None keeps the original size
    tta_ratios: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class TransformConfig:
    train: TrainTransformConfig = field(default_factory=TrainTransformConfig)
    eval: EvalTransformConfig = field(default_factory=EvalTransformConfig)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_STD))


@dataclass
class M2FLossConfig:
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True


@dataclass
class SegmentationTrainConfig(TrainConfig):
    diceloss_weight: float = 0.0  # linear head loss
    celoss_weight: float = 1.0
    m2f_loss: M2FLossConfig = field(default_factory=M2FLossConfig)


@dataclass
class EvalConfig:
    mode: InferenceMode = InferenceMode.SLIDE
    crop_size: int = 512
    stride: int = 341
    crop_batch_size: int = 8  # crops of one image per model call in slide mode
    eval_interval: int = 5000
    use_tta: bool = False  # scales from transforms.eval.tta_ratios + horizontal flip
    max_val_samples: int | None = None
    metric_to_save: str = "mIoU"  # chooses checkpoint_best.pth
    save_predictions: bool = False


@dataclass
class SegmentationConfig:
    task: str = "segmentation"
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: DatasetConfig = field(default_factory=DatasetConfig)
    decoder_head: DecoderConfig = field(default_factory=DecoderConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    train: SegmentationTrainConfig = field(default_factory=SegmentationTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"
    seed: int = 0
    precision: Precision = Precision.FLOAT32
    device: str | None = None  # None: CUDA when available, else CPU
    head: str | None = None  # head checkpoint for eval / predict (or a released segmentor's name)


def load_config(yaml_paths=(), overrides=(), require: tuple[str, ...] = ("",)) -> DictConfig:
    """Defaults < YAML files (in order) < `key=value` CLI overrides; every key and value range checked.
    `require`: key prefixes whose `???` values must be given (default: all; `check-data` needs only `datasets.`)."""
    return config_from_layers(read_layers(yaml_paths, overrides), require)


def config_from_layers(layers, require: tuple[str, ...] = ("",)) -> DictConfig:
    cfg = merge_layers(SegmentationConfig, layers, require)
    validate_config(cfg)
    return cfg


def validate_config(cfg: DictConfig) -> None:
    """Value ranges and cross-field checks OmegaConf cannot express."""
    validate_common(cfg)
    if cfg.task != "segmentation":
        fail("task", cfg.task, "this is a segmentation config")
    total = cfg.scheduler.total_iter
    if cfg.eval.eval_interval <= 0 or cfg.eval.eval_interval > total:
        fail("eval.eval_interval", cfg.eval.eval_interval, f"must be in [1, scheduler.total_iter={total}]")
    if cfg.eval.crop_size <= 0 or not 0 < cfg.eval.stride <= cfg.eval.crop_size:
        fail("eval.stride", cfg.eval.stride, f"must be in [1, eval.crop_size={cfg.eval.crop_size}]")
    lo, hi = cfg.transforms.train.random_img_size_ratio_range
    if not 0 < lo <= hi:
        fail("transforms.train.random_img_size_ratio_range", [lo, hi], "expected 0 < low <= high")
    if cfg.eval.metric_to_save not in SUMMARY_NAMES.values():
        fail("eval.metric_to_save", cfg.eval.metric_to_save, f"expected one of {list(SUMMARY_NAMES.values())}")
    for key in ("mean", "std"):
        if len(cfg.transforms[key]) != 3:
            fail(f"transforms.{key}", list(cfg.transforms[key]), "expected 3 values (RGB)")
