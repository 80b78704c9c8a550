"""Typed configuration of a depth run, with the field names and defaults of the official
`dinov3.eval.depth.config` (the defaults of ``configs/config-nyu.yaml`` are noted where they differ)."""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from omegaconf import MISSING

from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from ...engine.config import ModelConfig
from .loss import LossType
from .models import DecoderConfig
from .transforms import make_depth_eval_transforms, make_depth_train_transforms

__all__ = [
    "DatasetsConfig",
    "DecoderConfig",
    "DepthConfig",
    "Dtype",
    "EvalConfig",
    "EvalTransformConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ResultConfig",
    "ResultExtension",
    "SchedulerConfig",
    "TrainTransformConfig",
    "TransformConfig",
    "make_depth_eval_transforms_from_config",
    "make_depth_train_transforms_from_config",
]


class Dtype(Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"

    @property
    def autocast_dtype(self) -> torch.dtype:
        return {Dtype.BFLOAT16: torch.bfloat16, Dtype.FLOAT32: torch.float32}[self]


class ResultExtension(Enum):
    JPG = "jpg"
    PNG = "png"
    PTH = "pth"


@dataclass
class ResultConfig:
    save_results: bool = False
    extension: ResultExtension = ResultExtension.JPG
    save_resolution: int | None = None  # shorter side of the saved images; None = ground-truth size
    overlay_alpha: float = 1.0  # < 1 blends the colour-mapped depth over the image
    save_separate_files: bool = False  # also save image, prediction and ground truth as separate files


@dataclass
class DatasetsConfig:
    root: str = MISSING
    train: str = ""  # config-nyu.yaml: "NYU:split=TRAIN"
    val: str = ""  # config-nyu.yaml: "NYU:split=VAL"
    test: str = ""  # config-nyu.yaml: "NYU:split=VAL"


@dataclass
class OptimizerConfig:
    lr: float = 1e-4  # config-nyu.yaml: 3e-4
    beta1: float = 0.9
    beta2: float = 0.999  # config-nyu.yaml: 0.99
    weight_decay: float = 0.01  # config-nyu.yaml: 1e-4
    gradient_clip: float = 35.0


@dataclass
class SchedulerConfig:
    type: str = "WarmupOneCycleLR"
    total_iter: int = 38_400
    # config-nyu.yaml: final_div_factor 1000, warmup_iters 12800, base_momentum 0.85, max_momentum 0.95
    constructor_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainTransformConfig:
    img_size: Any = None  # int (shorter side) or [H, W]; None = keep
    random_crop: tuple[int, int] | None = None  # config-nyu.yaml: [416, 544]
    brightness_range: tuple[float, float] = (0.9, 1.1)  # config-nyu.yaml: [0.75, 1.25]
    rotation_angle: float = 2.5  # degrees
    fixed_crop: str = "FULL"  # config-nyu.yaml: NYU
    eval_mask: str = "FULL"  # mask of the training loss


@dataclass
class EvalTransformConfig:
    img_size: Any = None
    fixed_crop: str = "FULL"
    eval_mask: str = "FULL"  # config-nyu.yaml: NYU_EIGEN


@dataclass
class TransformConfig:
    train: TrainTransformConfig | None = None
    eval: EvalTransformConfig = field(default_factory=EvalTransformConfig)
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    normalization_constant: float = 1000.0  # stored depth units per metre


@dataclass
class EvalConfig:
    ignored_value: float = 0.0  # ground-truth value of pixels without depth
    align_least_squares: bool = False  # fit scale and shift of each prediction to its ground truth
    min_depth: float = 0.001  # evaluated depth range (metres)
    max_depth: float = 10.0
    use_tta: bool = True  # flip test-time augmentation
    eval_interval: int = 1600  # iterations between validations


@dataclass
class DepthConfig:
    model: ModelConfig | None = None
    bs: int = 2
    n_gpus: int = 8
    num_workers: int = 2
    seed: int = 321
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    datasets: DatasetsConfig = field(default_factory=DatasetsConfig)
    decoder_head: DecoderConfig = field(default_factory=DecoderConfig)  # config-nyu.yaml: linear, LAST, batchnorm
    model_dtype: Dtype | None = None
    losses: dict[LossType, float] | None = None  # e.g. {SIGLOSS: 1.0}
    transforms: TransformConfig = field(default_factory=TransformConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: list[str] = field(default_factory=lambda: ["rmse", "abs_rel", "a1"])
    result_config: ResultConfig = field(default_factory=ResultConfig)
    load_from: str | None = None  # head checkpoint to start from
    output_dir: str = ""


def make_depth_train_transforms_from_config(config: DepthConfig):
    if config.transforms.train is None:
        raise ValueError("transforms.train is not set: a training run needs its augmentation settings")
    train = config.transforms.train
    return make_depth_train_transforms(
        img_size=train.img_size,
        normalization_constant=config.transforms.normalization_constant,
        random_crop_size=train.random_crop,
        fixed_crop=train.fixed_crop,
        brightness_range=train.brightness_range,
        rotation_angle=train.rotation_angle,
        mean=config.transforms.mean,
        std=config.transforms.std,
    )


def make_depth_eval_transforms_from_config(config: DepthConfig, split: str = "val"):
    """Evaluation transforms; flip TTA (`eval.use_tta`) only for the "test" split, as the official code."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    return make_depth_eval_transforms(
        img_size=config.transforms.eval.img_size,
        normalization_constant=config.transforms.normalization_constant,
        fixed_crop=config.transforms.eval.fixed_crop,
        tta=config.eval.use_tta if split == "test" else False,
        mean=config.transforms.mean,
        std=config.transforms.std,
    )
