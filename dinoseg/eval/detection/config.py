"""Typed configuration of a detection run, and the detector head's settings at their official path
(`dinov3.eval.detection.config`: `DetectionHeadConfig`).

A detection config composes the engine's sections with the detection ones: `decoder_head` holds every
`DetectionHeadConfig` field (official names and defaults; `num_classes` None: from the training set or the head
checkpoint) and Plain-DETR's loss coefficients and matcher costs (its names and defaults); `optimizer` adds
Plain-DETR's parameter groups (`lr_backbone`, `wd_norm_names`, `wd_norm_mult`); `transforms` its augmentation.
`load_config(yaml_paths, overrides)` = `OmegaConf.merge(OmegaConf.structured(DetectionConfig), *yamls, cli)`;
OmegaConf rejects unknown keys and wrong types, and every value range is checked when the config loads.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ...data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from ...engine import config as engine_config
from ...engine.config import (
    FRACTION,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    ConfigError,
    FinetuneMode,
    ModelConfig,
    Precision,
    check_ranges,
    fail,
    is_given,
    merge_layers,
    read_layers,
    validate_common,
)
from ...engine.schedulers import SchedulerType
from .metrics import COCO_STAT_NAMES
from .models import DetectionHeadConfig
from .models.detr import check_head_config
from .models.position_encoding import PositionEncoding
from .models.transformer import DECODERS
from .transforms import CROP_MAX_SIZE, CROP_MIN_SIZE, CROP_SCALES, EVAL_SIZE, MAX_SIZE, SCALES

__all__ = ["ConfigError", "DetectionConfig", "DetectionHeadConfig", "PositionEncoding", "config_from_layers",
           "head_config", "load_config"]


@dataclass
class DatasetsConfig:
    # Descriptor strings: "COCO:root=/data/coco:split=train", "CocoJson:images=DIR:annotations=FILE",
    # "SyntheticBoxes:split=TRAIN:num_samples=256:image_size=96"; `category_ids_as_labels=true` for a 91-class head.
    train: str = "SyntheticBoxes:split=TRAIN"
    val: str = "SyntheticBoxes:split=VAL"  # validated every eval.eval_interval; what `dinoseg eval` evaluates
    root: str | None = None  # appended as ":root=..." when a descriptor has none (COCO)


@dataclass
class DecoderConfig:
    """The detector head: every `DetectionHeadConfig` field with its official default (but `num_classes`), then
    Plain-DETR's loss coefficients and matcher costs with its defaults (`main.py`)."""

    num_classes: int | None = None  # None: the training set's (train), the head checkpoint's (eval, predict)
    with_box_refine: bool = True
    two_stage: bool = True
    mixed_selection: bool = True
    look_forward_twice: bool = True
    k_one2many: int = 6  # each target matched this many times by the one-to-many queries
    lambda_one2many: float = 1.0  # weight of the one-to-many loss
    num_queries_one2one: int = 300
    num_queries_one2many: int = 1500  # training only; 0: no hybrid matching
    reparam: bool = True  # boxes in pixels, regressed as deltas (PlainDETRReParam)
    topk: int = 100  # detections kept per image (the released detector: 1500; COCO scores 100 per category)
    position_embedding: PositionEncoding = PositionEncoding.SINE
    num_feature_levels: int = 1
    dec_layers: int = 6
    dim_feedforward: int = 2048
    hidden_dim: int = 256
    dropout: float = 0.0
    nheads: int = 8
    norm_type: str = "pre_norm"
    aux_loss: bool = True
    proposal_feature_levels: int = 4
    proposal_min_size: int = 50
    decoder_type: str = "global_rpe_decomp"
    decoder_use_checkpoint: bool = False
    decoder_rpe_hidden_dim: int = 512
    decoder_rpe_type: str = "linear"
    add_transformer_encoder: bool = True
    num_encoder_layers: int = 6
    layers_to_use: Any = None  # the last n blocks (int) or block indices; None: four evenly spaced
    # Official: the ViT blocks that train (hard-coded off there). Given, it means model.finetune.mode=blocks with
    # model.finetune.blocks=len(list); it must be the last blocks the head reads (README "Backbone adaptation").
    blocks_to_train: list[int] | None = None
    n_windows_sqrt: int = 0
    proposal_in_stride: int | None = None  # None: the patch size
    proposal_tgt_strides: list[int] | None = None  # None: 0.5, 1, 2, 4 x the patch size
    backbone_use_layernorm: bool = False
    encoder_dropout: float | None = None  # None: `dropout` (official code: 0.1 whatever `dropout` says)
    # Loss (Plain-DETR): weights of the focal class loss, the L1 box loss and the GIoU loss ...
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    # ... and of the same terms in the Hungarian matching cost; focal loss alpha.
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    focal_alpha: float = 0.25


HEAD_FIELDS = tuple(f.name for f in dataclasses.fields(DetectionHeadConfig))
LOSS_FIELDS = ("cls_loss_coef", "bbox_loss_coef", "giou_loss_coef", "set_cost_class", "set_cost_bbox", "set_cost_giou",
               "focal_alpha")
# Plain-DETR's names of the parameters trained without weight decay (with `wd_norm_mult` 0), matched as substrings.
WD_NORM_NAMES = ["norm", "bias", "rpb_mlp", "cpb_mlp", "logit_scale", "relative_position_bias_table", "level_embed",
                 "reference_points", "sampling_offsets", "rel_pos"]


@dataclass
class DetectionOptimizerConfig(engine_config.OptimizerConfig):
    """AdamW with Plain-DETR's defaults (`main.py`) and its parameter groups: parameters whose name contains one of
    `lr_backbone_names` train at `lr_backbone` (the trainable parts of the backbone: its LayerNorms with
    `decoder_head.backbone_use_layernorm`, and the adapted tensors of an adapted backbone), those matching
    `wd_norm_names` with weight decay x `wd_norm_mult`. `lr_backbone` is Plain-DETR's name for `lr` x
    `model.finetune.lr_multiplier`: give either (the other follows), or both consistently."""

    lr: float = 2e-4
    weight_decay: float = 1e-4
    gradient_clip: float = 0.1  # Plain-DETR's clip_max_norm
    lr_backbone: float = 2e-5
    lr_backbone_names: list[str] = field(default_factory=lambda: ["backbone.0"])
    wd_norm_names: list[str] = field(default_factory=lambda: list(WD_NORM_NAMES))
    wd_norm_mult: float = 1.0


@dataclass
class DetectionSchedulerConfig(engine_config.SchedulerConfig):
    """Plain-DETR's schedule in iterations: a linear warm-up from 0 (`warmup`), then the lr x 0.1 from `lr_drop`
    (here: 12 epochs of COCO train2017 at 16 images, 7,392 iterations each, the drop after 11)."""

    type: SchedulerType = SchedulerType.STEP
    total_iter: int = 88_704
    warmup_iters: int = 1000
    warmup_ratio: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [81_312])
    gamma: float = 0.1


@dataclass
class DetectionTrainConfig(engine_config.TrainConfig):
    """16 images per iteration (Plain-DETR: 16 GPUs x 1), 2 loader workers per process (its default)."""

    batch_size: int = 16
    num_workers: int = 2
    checkpoint_interval: int = 7392  # an epoch of COCO train2017


@dataclass
class TrainTransformConfig:
    """Plain-DETR's augmentation: flip, then either a resize of the short side to one of `scales` (the long side at
    most `max_size`) or a resize to one of `crop_scales`, a random crop of `crop_min_size`..`crop_max_size` pixels,
    and the same multi-scale resize; `crop_scales: null` leaves out the crop branch."""

    scales: list[int] = field(default_factory=lambda: list(SCALES))
    max_size: int | None = MAX_SIZE
    crop_scales: list[int] | None = field(default_factory=lambda: list(CROP_SCALES))
    crop_min_size: int = CROP_MIN_SIZE
    crop_max_size: int = CROP_MAX_SIZE
    flip_prob: float = 0.5


@dataclass
class EvalTransformConfig:
    size: int = EVAL_SIZE  # short side
    max_size: int | None = MAX_SIZE  # long side at most


@dataclass
class TransformConfig:
    train: TrainTransformConfig = field(default_factory=TrainTransformConfig)
    eval: EvalTransformConfig = field(default_factory=EvalTransformConfig)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_STD))


@dataclass
class EvalConfig:
    eval_interval: int = 7392  # iterations between validations (COCO box AP by pycocotools)
    max_val_samples: int | None = None  # validate on the first N images only
    metric_to_save: str = "AP"  # chooses checkpoint_best.pth (every COCO number: higher is better)
    score_threshold: float = 0.3  # predict: the detections drawn and written (COCO AP scores all `topk` of them)


@dataclass
class DetectionConfig:
    task: str = "detection"
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: DatasetsConfig = field(default_factory=DatasetsConfig)
    decoder_head: DecoderConfig = field(default_factory=DecoderConfig)
    optimizer: DetectionOptimizerConfig = field(default_factory=DetectionOptimizerConfig)
    scheduler: DetectionSchedulerConfig = field(default_factory=DetectionSchedulerConfig)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    train: DetectionTrainConfig = field(default_factory=DetectionTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/detection"
    overwrite_output_dir: bool = False  # train into a directory that holds another run, replacing its files
    seed: int = 42  # Plain-DETR's
    precision: Precision = Precision.FLOAT32
    device: str | None = None  # None: CUDA when available, else CPU
    head: str | None = None  # head checkpoint for eval / predict, or the released detector "dinov3_vit7b16_de"


def load_config(yaml_paths=(), overrides=(), require: tuple[str, ...] = ("",)) -> DictConfig:
    """Defaults < YAML files (in order) < `key=value` CLI overrides; every key and value range checked.
    `require`: key prefixes whose `???` values must be given (default: all; `check-data` needs only `datasets.`)."""
    return config_from_layers(read_layers(yaml_paths, overrides), require)


def config_from_layers(layers, require: tuple[str, ...] = ("",)) -> DictConfig:
    cfg = merge_layers(DetectionConfig, layers, require)
    validate_config(cfg)
    reconcile_backbone_training(cfg, layers)
    return cfg


def reconcile_backbone_training(cfg: DictConfig, layers) -> None:
    """The official / Plain-DETR names of what `model.finetune` says, made one with it (in `cfg`, so that the saved
    config records both consistently); a contradiction between them is a one-line error. `layers` tell which keys
    the YAML files and overrides set.

    - `optimizer.lr_backbone` (Plain-DETR, absolute) = `optimizer.lr` x `model.finetune.lr_multiplier`: the one not
      given follows the other; when neither is given, Plain-DETR's 2e-5 stands (so frozen runs train as before).
    - `decoder_head.blocks_to_train` (official, a list of block indices) = `model.finetune.mode: blocks` with
      `model.finetune.blocks` = its length (which blocks: checked when the backbone is built)."""
    o, f = cfg.optimizer, cfg.model.finetune
    if is_given(layers, "model.finetune.lr_multiplier") and is_given(layers, "optimizer.lr_backbone"):
        if not math.isclose(o.lr_backbone, o.lr * f.lr_multiplier, rel_tol=1e-6):
            raise ConfigError(f"optimizer.lr_backbone={o.lr_backbone!r} and model.finetune.lr_multiplier="
                              f"{f.lr_multiplier!r} x optimizer.lr={o.lr!r} give the backbone two learning rates: set one "
                              f"of them (lr_backbone is Plain-DETR's name for lr x lr_multiplier)")
    elif is_given(layers, "model.finetune.lr_multiplier"):
        o.lr_backbone = o.lr * f.lr_multiplier
    elif o.lr_backbone > 0:
        f.lr_multiplier = o.lr_backbone / o.lr
    elif FinetuneMode(f.mode) != FinetuneMode.FROZEN:
        fail("optimizer.lr_backbone", o.lr_backbone, f"the adapted backbone (model.finetune.mode={FinetuneMode(f.mode).value}) "
             "would not train; give it a learning rate > 0")
    chosen = cfg.decoder_head.blocks_to_train
    if chosen is None:
        return
    mode = FinetuneMode(f.mode)
    if mode == FinetuneMode.LORA or (mode == FinetuneMode.FROZEN and is_given(layers, "model.finetune.mode")):
        other = f"model.finetune.mode={mode.value}"
    elif is_given(layers, "model.finetune.blocks") and f.blocks != len(chosen):
        other = f"model.finetune.blocks={f.blocks}"
    else:
        f.mode, f.blocks = FinetuneMode.BLOCKS, len(chosen)
        return
    fail("decoder_head.blocks_to_train", list(chosen), f"trains {len(chosen)} blocks, {other} says otherwise: set "
         f"one of them (blocks_to_train is the official name of model.finetune.mode=blocks with blocks={len(chosen)})")


def _is_layers(value) -> bool:
    """A positive int (the last n blocks) or a non-empty list of block indices >= 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value > 0
    items = list(value) if OmegaConf.is_list(value) or isinstance(value, list | tuple) else None
    return bool(items) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items)


def _sizes(value) -> bool:
    return len(value) > 0 and all(v > 0 for v in value)


POSITIVE_SIZES = (_sizes, "expected a non-empty list of positive sizes")


def head_config(cfg: DictConfig, num_classes: int | None = None) -> DetectionHeadConfig:
    """The `DetectionHeadConfig` of `cfg.decoder_head` (its loss settings left out), with `num_classes` when the
    section leaves it None."""
    section = OmegaConf.to_container(cfg.decoder_head, resolve=True, enum_to_str=False)
    values = {k: section[k] for k in HEAD_FIELDS}
    values["num_classes"] = values["num_classes"] or num_classes or DetectionHeadConfig.num_classes
    return DetectionHeadConfig(**values)


def validate_config(cfg: DictConfig) -> None:
    """Value ranges and cross-field checks OmegaConf cannot express, so a bad value fails before anything runs."""
    validate_common(cfg)
    if cfg.task != "detection":
        fail("task", cfg.task, "this is a detection config")
    total = cfg.scheduler.total_iter
    check_ranges(cfg, {
        "datasets.train": (bool, "expected a dataset descriptor such as CocoJson:images=DIR:annotations=FILE"),
        "datasets.val": (bool, "expected a dataset descriptor such as CocoJson:images=DIR:annotations=FILE"),
        "decoder_head.num_classes": (lambda v: v > 0, "must be positive (or null: from the training set or the head)"),
        "decoder_head.k_one2many": POSITIVE, "decoder_head.lambda_one2many": NON_NEGATIVE,
        "decoder_head.num_queries_one2one": POSITIVE, "decoder_head.num_queries_one2many": NON_NEGATIVE,
        "decoder_head.topk": POSITIVE, "decoder_head.num_feature_levels": POSITIVE,
        "decoder_head.dec_layers": POSITIVE, "decoder_head.dim_feedforward": POSITIVE,
        "decoder_head.hidden_dim": POSITIVE, "decoder_head.nheads": POSITIVE,
        "decoder_head.dropout": OPEN_FRACTION,
        "decoder_head.encoder_dropout": (lambda v: 0 <= v < 1, "must be in [0, 1) (or null: decoder_head.dropout)"),
        "decoder_head.norm_type": (lambda v: v in ("pre_norm", "post_norm"), "expected pre_norm or post_norm"),
        "decoder_head.proposal_feature_levels": POSITIVE, "decoder_head.proposal_min_size": NON_NEGATIVE,
        "decoder_head.decoder_type": (lambda v: v in DECODERS, f"expected one of {sorted(DECODERS)}"),
        "decoder_head.decoder_rpe_hidden_dim": POSITIVE,
        "decoder_head.decoder_rpe_type": (lambda v: v in ("linear", "abs_log8"), "expected linear or abs_log8"),
        "decoder_head.num_encoder_layers": NON_NEGATIVE,
        "decoder_head.layers_to_use": (_is_layers, "expected the number of last blocks or a list of block indices"),
        "decoder_head.n_windows_sqrt": NON_NEGATIVE, "decoder_head.proposal_in_stride": POSITIVE,
        "decoder_head.blocks_to_train": (lambda v: len(v) > 0 and len(set(v)) == len(v) and min(v) >= 0,
                                         "expected distinct block indices (or null: the backbone stays frozen)"),
        "decoder_head.proposal_tgt_strides": POSITIVE_SIZES,
        **{f"decoder_head.{k}": (lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0")
           for k in LOSS_FIELDS},
        "decoder_head.focal_alpha": (lambda v: v < 0 or v <= 1, "must be in [0, 1] (or negative: no weighting)"),
        "optimizer.lr_backbone": NON_NEGATIVE, "optimizer.wd_norm_mult": NON_NEGATIVE,
        "transforms.train.scales": POSITIVE_SIZES, "transforms.train.max_size": POSITIVE,
        "transforms.train.crop_scales": POSITIVE_SIZES, "transforms.train.crop_min_size": POSITIVE,
        "transforms.train.crop_max_size": (lambda v: v >= cfg.transforms.train.crop_min_size,
                                           f"must be >= transforms.train.crop_min_size={cfg.transforms.train.crop_min_size}"),
        "transforms.train.flip_prob": FRACTION,
        "transforms.eval.size": POSITIVE, "transforms.eval.max_size": POSITIVE,
        "transforms.mean": (lambda v: len(v) == 3, "expected 3 values (RGB)"),
        "transforms.std": (lambda v: len(v) == 3 and all(x > 0 for x in v), "expected 3 positive values (RGB)"),
        "eval.eval_interval": (lambda v: 0 < v <= total, f"must be in [1, scheduler.total_iter={total}]"),
        "eval.max_val_samples": POSITIVE,
        "eval.metric_to_save": (lambda v: v in COCO_STAT_NAMES, f"expected one of {list(COCO_STAT_NAMES)}"),
        "eval.score_threshold": FRACTION,
    })
    head = cfg.decoder_head
    if head.set_cost_class == 0 and head.set_cost_bbox == 0 and head.set_cost_giou == 0:
        fail("decoder_head.set_cost_class", 0.0, "set_cost_class, set_cost_bbox and set_cost_giou are all 0: the "
             "matching would be arbitrary")
    if head.cls_loss_coef == 0 and head.bbox_loss_coef == 0 and head.giou_loss_coef == 0:
        fail("decoder_head.cls_loss_coef", 0.0, "cls_loss_coef, bbox_loss_coef and giou_loss_coef are all 0: no loss to train")
    t = cfg.transforms.train
    if t.max_size is not None and t.max_size < min(t.scales):
        fail("transforms.train.max_size", t.max_size, f"must be >= the smallest of transforms.train.scales={list(t.scales)}")
    e = cfg.transforms.eval
    if e.max_size is not None and e.max_size < e.size:
        fail("transforms.eval.max_size", e.max_size, f"must be >= transforms.eval.size={e.size}")
    try:
        check_head_config(head_config(cfg))
    except ValueError as err:
        raise ConfigError(f"decoder_head: {err}") from None
