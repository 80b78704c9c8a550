"""Typed configuration of a segmentation run: the engine's shared sections plus the segmentation ones.

`load_config(yaml_paths, overrides)` = `OmegaConf.merge(OmegaConf.structured(SegmentationConfig), *yamls, cli)`;
OmegaConf rejects unknown keys and wrong types, and every value range is checked when the config loads.
"""

from dataclasses import dataclass, field

from omegaconf import DictConfig

from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from ...engine.config import (
    FRACTION,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    ConfigError,
    ModelConfig,
    OptimizerConfig,
    Precision,
    SchedulerConfig,
    TrainConfig,
    check_ranges,
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
    overwrite_output_dir: bool = False  # train into a directory that holds another run, replacing its files
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
    """Value ranges and cross-field checks OmegaConf cannot express, so a bad value fails before anything runs."""
    validate_common(cfg)
    if cfg.task != "segmentation":
        fail("task", cfg.task, "this is a segmentation config")
    total = cfg.scheduler.total_iter
    crop = cfg.eval.crop_size
    check_ranges(cfg, {
        "decoder_head.num_classes": (lambda v: v > 0, "must be positive (or null: from the head checkpoint or dataset)"),
        "decoder_head.hidden_dim": POSITIVE, "decoder_head.dropout": OPEN_FRACTION,
        "decoder_head.m2f.num_queries": POSITIVE, "decoder_head.m2f.nheads": POSITIVE,
        "decoder_head.m2f.dim_feedforward": POSITIVE, "decoder_head.m2f.enc_layers": POSITIVE,
        "decoder_head.m2f.dec_layers": POSITIVE, "decoder_head.m2f.pixel_decoder_nheads": POSITIVE,
        "decoder_head.m2f.adapter.conv_inplane": POSITIVE, "decoder_head.m2f.adapter.n_points": POSITIVE,
        "decoder_head.m2f.adapter.deform_num_heads": POSITIVE, "decoder_head.m2f.adapter.drop_path_rate": OPEN_FRACTION,
        "decoder_head.m2f.adapter.cffn_ratio": POSITIVE, "decoder_head.m2f.adapter.deform_ratio": POSITIVE,
        "transforms.train.img_size": POSITIVE, "transforms.train.crop_size": POSITIVE,
        "transforms.train.cat_max_ratio": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
        "transforms.train.flip_prob": FRACTION, "transforms.eval.img_size": POSITIVE,
        "transforms.eval.tta_ratios": (lambda v: len(v) > 0 and all(r > 0 for r in v),
                                       "expected a non-empty list of positive ratios"),
        "transforms.mean": (lambda v: len(v) == 3, "expected 3 values (RGB)"),
        "transforms.std": (lambda v: len(v) == 3 and all(x > 0 for x in v), "expected 3 positive values (RGB)"),
        "train.diceloss_weight": NON_NEGATIVE, "train.celoss_weight": NON_NEGATIVE,
        "train.m2f_loss.class_weight": NON_NEGATIVE, "train.m2f_loss.mask_weight": NON_NEGATIVE,
        "train.m2f_loss.dice_weight": NON_NEGATIVE, "train.m2f_loss.no_object_weight": NON_NEGATIVE,
        "train.m2f_loss.train_num_points": POSITIVE, "train.m2f_loss.oversample_ratio": (lambda v: v >= 1, "must be >= 1"),
        "train.m2f_loss.importance_sample_ratio": FRACTION,
        "eval.crop_size": POSITIVE, "eval.stride": (lambda v: 0 < v <= crop, f"must be in [1, eval.crop_size={crop}]"),
        "eval.crop_batch_size": POSITIVE, "eval.max_val_samples": POSITIVE,
        "eval.eval_interval": (lambda v: 0 < v <= total, f"must be in [1, scheduler.total_iter={total}]"),
        "eval.metric_to_save": (lambda v: v in SUMMARY_NAMES.values(), f"expected one of {list(SUMMARY_NAMES.values())}"),
    })
    lo, hi = cfg.transforms.train.random_img_size_ratio_range
    if not 0 < lo <= hi:
        fail("transforms.train.random_img_size_ratio_range", [lo, hi], "expected 0 < low <= high")
    if cfg.train.diceloss_weight == 0 and cfg.train.celoss_weight == 0:
        fail("train.celoss_weight", 0.0, "train.diceloss_weight and train.celoss_weight are both 0: no loss to train")
    head = cfg.decoder_head
    if DecoderType(head.type) is DecoderType.M2F:
        for key in ("nheads", "pixel_decoder_nheads"):
            if head.hidden_dim % head.m2f[key]:
                fail(f"decoder_head.m2f.{key}", head.m2f[key], f"must divide decoder_head.hidden_dim={head.hidden_dim}")
