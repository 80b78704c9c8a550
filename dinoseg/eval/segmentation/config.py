"""Typed configuration of a segmentation run: dataclasses merged with YAML files and CLI overrides.

`load_config(yaml_paths, overrides)` = `OmegaConf.merge(OmegaConf.structured(SegmentationConfig), *yamls, cli)`;
OmegaConf rejects unknown keys and wrong types, and we turn its errors into one line naming the key.
"""

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..utils import BackboneLayersSet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the value at fault."""


class Precision(Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"  # autocast on CPU and CUDA
    FLOAT16 = "float16"  # autocast + gradient scaler, CUDA only


class SchedulerType(Enum):
    WarmupOneCycleLR = "WarmupOneCycleLR"  # the official linear-probe schedule
    POLY = "poly"  # Mask2Former's schedule
    CONSTANT = "constant"


class InferenceMode(Enum):
    WHOLE = "whole"
    SLIDE = "slide"


@dataclass
class ModelConfig:
    # A hub name (dinov3_vits16 ... dinov3_vit7b16, dinov3_convnext_tiny ... _large) or None to build a ViT from
    # `backbone_kwargs`; a custom ConvNeXt is a dinov3_convnext_* name with `depths` / `dims` overrides.
    dino_hub: str | None = "dinov3_vits16"
    # Official .pth, Hugging Face directory/safetensors, file:// or https:// URL. None = random weights
    # (only meaningful for demos and tests).
    pretrained_weights: str | None = None
    # Constructor keywords: override the hub architecture, or the whole architecture when dino_hub is None.
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    # Seed of the random backbone weights when pretrained_weights is None (so eval/predict rebuild the same one).
    random_init_seed: int = 0


@dataclass
class DatasetConfig:
    # Official descriptor strings, e.g. "ADE20K:split=TRAIN", "Synthetic:split=VAL:num_samples=32".
    train: str = "Synthetic:split=TRAIN"
    val: str = "Synthetic:split=VAL"
    root: str | None = None  # appended as ":root=..." when a descriptor has none


@dataclass
class AdapterConfig:
    """ViT-Adapter options (defaults: the official adapter; changing shapes breaks official checkpoints)."""

    conv_inplane: int = 64  # spatial prior module width
    n_points: int = 4  # deformable sampling points per head and level
    deform_num_heads: int = 16
    drop_path_rate: float = 0.3  # stochastic depth of the extractor FFNs (training only)
    with_cffn: bool = True  # the ConvFFN after each extractor
    cffn_ratio: float = 0.25
    deform_ratio: float = 0.5  # value projection width / embed_dim in the extractors
    use_extra_extractor: bool = True  # two more extractors on the last interaction
    with_cp: bool = True  # gradient checkpointing of the extractors (less memory, more compute)


@dataclass
class M2FConfig:
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    num_queries: int = 100
    nheads: int = 16
    dim_feedforward: int = 4096
    enc_layers: int = 6
    dec_layers: int = 9
    pixel_decoder_nheads: int = 16


@dataclass
class DecoderConfig:
    type: str = "linear"  # linear | m2f
    backbone_out_layers: BackboneLayersSet = BackboneLayersSet.LAST
    use_batchnorm: bool = True
    use_cls_token: bool = False
    num_classes: int | None = None  # None: taken from the training dataset
    hidden_dim: int = 2048  # Mask2Former only
    dropout: float = 0.1  # linear head, training only
    m2f: M2FConfig = field(default_factory=M2FConfig)


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
    poly_power: float = 0.9
    min_lr: float = 0.0  # poly only


@dataclass
class TrainTransformConfig:
    img_size: int = 512  # short side before the random ratio
    random_img_size_ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    crop_size: int = 512
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric_distortion: bool = True


@dataclass
class EvalTransformConfig:
    img_size: int | None = 512  # short side; None keeps the original size
    tta_ratios: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class TransformConfig:
    train: TrainTransformConfig = field(default_factory=TrainTransformConfig)
    eval: EvalTransformConfig = field(default_factory=EvalTransformConfig)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


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
class TrainConfig:
    batch_size: int = 16  # images per iteration, summed over all processes
    num_workers: int = 4  # data-loading workers per process
    diceloss_weight: float = 0.0
    celoss_weight: float = 1.0
    m2f_loss: M2FLossConfig = field(default_factory=M2FLossConfig)
    checkpoint_interval: int = 1000
    log_interval: int = 50
    resume: bool = False  # continue from <output_dir>/checkpoint_last.pth
    tensorboard: bool = False


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
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: DatasetConfig = field(default_factory=DatasetConfig)
    decoder_head: DecoderConfig = field(default_factory=DecoderConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"
    seed: int = 0
    precision: Precision = Precision.FLOAT32
    device: str | None = None  # None: CUDA when available, else CPU
    load_from: str | None = None  # head checkpoint for eval / predict


CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"


def _one_line(err: OmegaConfBaseException) -> str:
    msg = str(err).splitlines()[0]
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


def load_config(yaml_paths: list[str | Path] = (), overrides: list[str] = (), require: tuple[str, ...] = ("",)
                ) -> DictConfig:
    """Defaults < YAML files (in order) < `key=value` CLI overrides; every key checked against the schema.

    `require`: key prefixes whose `???` values must be given (default: all; `dinoseg check-data` needs only
    `datasets.`)."""
    cfg = OmegaConf.structured(SegmentationConfig)
    layers = []
    for path in yaml_paths:
        path = Path(path)
        if not path.exists() and (CONFIG_DIR / path).exists():
            path = CONFIG_DIR / path  # `dinoseg train demo.yaml` finds the shipped configs
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            OmegaConf.from_dotlist([item])
        except Exception as e:  # any YAML error in the value
            raise ConfigError(f"override {item!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.merge(cfg, *layers)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    # A YAML marks a value the user must give with `???`; merging would silently keep the default instead.
    required: set[str] = set()
    for layer in layers:
        keys = _leaf_keys(layer)
        required = (required - {k for k, missing in keys.items() if not missing}) | {
            k for k, missing in keys.items() if missing}
    required = {k for k in required if k.startswith(tuple(require))}
    if required:
        key = sorted(required)[0]
        raise ConfigError(f"{key}: required value missing (add {key}=... to the command line)")
    validate_config(cfg)
    return cfg


def validate_config(cfg: DictConfig) -> None:
    """Cross-field checks OmegaConf cannot express."""
    def fail(key, value, why):
        raise ConfigError(f"{key}={value!r}: {why}")


    if cfg.decoder_head.type not in ("linear", "m2f"):
        fail("decoder_head.type", cfg.decoder_head.type, "expected 'linear' or 'm2f'")
    total = cfg.scheduler.total_iter
    if total <= 0:
        fail("scheduler.total_iter", total, "must be positive")
    if cfg.eval.eval_interval <= 0 or cfg.eval.eval_interval > total:
        fail("eval.eval_interval", cfg.eval.eval_interval, f"must be in [1, scheduler.total_iter={total}]")
    if cfg.train.checkpoint_interval <= 0:
        fail("train.checkpoint_interval", cfg.train.checkpoint_interval, "must be positive")
    if cfg.scheduler.warmup_iters < 0 or cfg.scheduler.warmup_iters >= total:
        fail("scheduler.warmup_iters", cfg.scheduler.warmup_iters, f"must be in [0, scheduler.total_iter={total})")
    if cfg.train.batch_size <= 0:
        fail("train.batch_size", cfg.train.batch_size, "must be positive")
    if cfg.eval.crop_size <= 0 or not 0 < cfg.eval.stride <= cfg.eval.crop_size:
        fail("eval.stride", cfg.eval.stride, f"must be in [1, eval.crop_size={cfg.eval.crop_size}]")
    lo, hi = cfg.transforms.train.random_img_size_ratio_range
    if not 0 < lo <= hi:
        fail("transforms.train.random_img_size_ratio_range", [lo, hi], "expected 0 < low <= high")
    if cfg.model.dino_hub is None and not cfg.model.backbone_kwargs:
        fail("model.dino_hub", None, "give a hub name or model.backbone_kwargs")
    summary = ("mIoU", "mAcc", "aAcc", "mDice", "mFscore", "mPrecision", "mRecall")
    if cfg.eval.metric_to_save not in summary:
        fail("eval.metric_to_save", cfg.eval.metric_to_save, f"expected one of {list(summary)}")
    for key in ("mean", "std"):
        if len(cfg.transforms[key]) != 3:
            fail(f"transforms.{key}", list(cfg.transforms[key]), "expected 3 values (RGB)")


def save_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "segmentation_config.yaml"
    OmegaConf.save(cfg, path, resolve=True)
    return path
