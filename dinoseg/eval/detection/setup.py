"""From a detection config to the objects a run uses; below this file, functions take values, not the config."""

import math

import torch
from omegaconf import DictConfig

from ...data import DetectionDataset, make_dataset
from ...engine.adaptation import adapt_for_head, adapt_for_training, build_frozen_backbone
from ...engine.config import ConfigError, Precision, fail
from ...engine.optim import build_optimizer as _build_optimizer
from ...models.checkpoint import CheckpointError
from ...models.finetune import FinetuneError, backbone_lr_scales
from ...models.precision import cast_weights
from .config import head_config
from .loss import SetCriterion
from .loss import build_criterion as _build_criterion
from .models import PostProcess, build_model
from .models.backbone import block_indices
from .models.detr import PlainDETR, load_detector_head, resolve_head_config
from .transforms import DetectionTransform, make_detection_eval_transforms, make_detection_train_transforms


def build_backbone(cfg: DictConfig) -> torch.nn.Module:
    """The frozen backbone of `model` (before any `model.finetune` adaptation)."""
    return build_frozen_backbone(cfg.model)


def adapt_backbone(cfg: DictConfig, backbone: torch.nn.Module) -> torch.nn.Module:
    """`backbone` adapted as `model.finetune` says, for training the configured head: blocks past the deepest one it
    reads (`decoder_head.layers_to_use`) never run, so they are neither adapted nor trained. The official
    `decoder_head.blocks_to_train` (turned into `model.finetune.mode: blocks` when the config loads) must name
    exactly the blocks that mode trains: the last `blocks` of those the head reads."""
    try:
        layers = resolve_head_config(backbone, head_config(cfg)).layers_to_use
        last = max(block_indices(backbone.n_blocks, layers))
    except ValueError as e:
        raise ConfigError(f"decoder_head: {e}") from None
    chosen = cfg.decoder_head.blocks_to_train
    if chosen is not None:
        trained = list(range(last - len(chosen) + 1, last + 1))
        if sorted(chosen) != trained:
            fail("decoder_head.blocks_to_train", list(chosen), f"dinoseg trains the last blocks the head reads, here "
                 f"{trained} (the head reads up to block {last}); set model.finetune.blocks={len(chosen)} instead")
    return adapt_for_training(backbone, cfg.model, last_read_block=last, seed=cfg.seed)


def _detector(cfg: DictConfig, num_classes: int, backbone: torch.nn.Module) -> PlainDETR:
    try:
        return build_model(backbone, head_config(cfg, num_classes))
    except ValueError as e:  # layers past the backbone's depth, windows on a backbone too small...
        raise ConfigError(f"decoder_head: {e}") from None


def build_detector(cfg: DictConfig, num_classes: int, backbone: torch.nn.Module | None = None) -> PlainDETR:
    """The configured detector with a freshly initialised head, its backbone adapted as `model.finetune` says."""
    return _detector(cfg, num_classes, adapt_backbone(cfg, backbone if backbone is not None else build_backbone(cfg)))


def head_num_classes(state_dict: dict, source: str) -> int:
    """The number of classes a detector head checkpoint was trained with (its class head's rows)."""
    for key in ("class_embed.0.weight", "module.class_embed.0.weight", "transformer.decoder.class_embed.0.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    raise CheckpointError(f"{source}: not a detector head checkpoint (no class_embed.0.weight)")


def build_detector_with_head(cfg: DictConfig, state_dict: dict, source: str) -> PlainDETR:
    """The configured detector, its head loaded strictly from `state_dict` (a training checkpoint's ``model``, with
    the adapted tensors of an adapted backbone, which is rebuilt as the checkpoint `source` records; or a released
    head file); with `model.weights_dtype` half, the head is stored in half precision too."""
    num_classes = cfg.decoder_head.num_classes or head_num_classes(state_dict, source)
    backbone = build_backbone(cfg)
    backbone = adapt_for_head(backbone, cfg.model, source)
    model = load_detector_head(_detector(cfg, num_classes, backbone), state_dict, source=source)
    return cast_weights(model, Precision(cfg.model.weights_dtype).dtype)


def build_criterion(cfg: DictConfig, num_classes: int) -> SetCriterion:
    h = cfg.decoder_head
    return _build_criterion(num_classes, reparam=h.reparam, dec_layers=h.dec_layers, aux_loss=h.aux_loss,
                            two_stage=h.two_stage, cls_loss_coef=h.cls_loss_coef, bbox_loss_coef=h.bbox_loss_coef,
                            giou_loss_coef=h.giou_loss_coef, set_cost_class=h.set_cost_class,
                            set_cost_bbox=h.set_cost_bbox, set_cost_giou=h.set_cost_giou, focal_alpha=h.focal_alpha)


def param_groups(model: torch.nn.Module, lr: float, lr_backbone: float, backbone_names, wd_norm_names,
                 weight_decay: float, wd_norm_mult: float, *, layer_decay: float = 1.0) -> list[dict]:
    """Plain-DETR's parameter groups (`util.misc.get_param_dict`, names matched as substrings): the head at `lr`,
    parameters named by `backbone_names` at `lr_backbone`; those named by `wd_norm_names` with weight decay x
    `wd_norm_mult`. (Its `lr_linear_proj_names`, the deformable attention's sampling offsets and reference points,
    match nothing in these global-attention decoders.) The adapted tensors of an adapted ViT (under `backbone.0`,
    whatever `backbone_names` says) train at `lr_backbone` x `layer_decay` ** their depth from the top
    (`models.finetune.backbone_lr_scales`)."""
    depth_scales = backbone_lr_scales(model, lr_multiplier=1.0, layer_decay=layer_decay)
    groups: dict[tuple[bool, bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        backbone = name in depth_scales or any(k in name for k in backbone_names)
        norm = any(k in name for k in wd_norm_names)
        depth_scale = depth_scales.get(name, 1.0)
        key = (backbone, norm, -depth_scale)
        if key not in groups:
            groups[key] = {"params": [], "lr_scale": (lr_backbone / lr if backbone else 1.0) * depth_scale,
                           "weight_decay": weight_decay * (wd_norm_mult if norm else 1.0)}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]  # the head (no backbone, with decay) first: its lr is logged


def build_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.AdamW:
    o = cfg.optimizer
    try:
        groups = param_groups(model, o.lr, o.lr_backbone, list(o.lr_backbone_names), list(o.wd_norm_names),
                              o.weight_decay, o.wd_norm_mult, layer_decay=cfg.model.finetune.layer_decay)
    except FinetuneError as e:
        raise ConfigError(str(e)) from None
    return _build_optimizer(model, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, param_groups=groups)


def build_train_transforms(cfg: DictConfig) -> DetectionTransform:
    t = cfg.transforms
    return make_detection_train_transforms(
        scales=list(t.train.scales), max_size=t.train.max_size,
        crop_scales=None if t.train.crop_scales is None else list(t.train.crop_scales),
        crop_min_size=t.train.crop_min_size, crop_max_size=t.train.crop_max_size, flip_prob=t.train.flip_prob,
        reparam=cfg.decoder_head.reparam, mean=tuple(t.mean), std=tuple(t.std))


def build_eval_transforms(cfg: DictConfig) -> DetectionTransform:
    t = cfg.transforms
    return make_detection_eval_transforms(size=t.eval.size, max_size=t.eval.max_size, reparam=cfg.decoder_head.reparam,
                                          mean=tuple(t.mean), std=tuple(t.std))


def build_dataset(cfg: DictConfig, split: str, transforms=None, **options) -> DetectionDataset:
    """`datasets.<split>`, checked to be a detection dataset."""
    descriptor = cfg.datasets[split]
    dataset = make_dataset(descriptor, transforms=transforms, default_root=cfg.datasets.root, **options)
    if not isinstance(dataset, DetectionDataset):
        raise ConfigError(f"datasets.{split}={descriptor!r}: {type(dataset).__name__} is not a detection dataset "
                          "(COCO, CocoJson, SyntheticBoxes)")
    return dataset


def build_train_dataset(cfg: DictConfig) -> DetectionDataset:
    return build_dataset(cfg, "train", build_train_transforms(cfg))


def build_val_dataset(cfg: DictConfig) -> DetectionDataset:
    return build_dataset(cfg, "val", build_eval_transforms(cfg))


def check_classes(dataset: DetectionDataset, num_classes: int, split: str, head: str) -> None:
    """A head of `num_classes` outputs must fit the dataset's labels."""
    if dataset.num_classes != num_classes:
        hint = ("; a 91-class COCO head needs category_ids_as_labels=true in the dataset descriptor"
                if num_classes == 91 and not dataset.category_ids_as_labels else "")
        raise ConfigError(f"datasets.{split}: {type(dataset).__name__} has {dataset.num_classes} classes but {head} "
                          f"predicts {num_classes}{hint}")


def build_postprocess(cfg: DictConfig) -> PostProcess:
    return PostProcess(cfg.decoder_head.topk, cfg.decoder_head.reparam)


@torch.no_grad()
def num_proposals(model: PlainDETR, side: int) -> int:
    """How many proposals the two-stage `model` makes for a `side` x `side` image (the fewest of any image whose
    short side is `side`); ValueError when such an image is too small for its coarsest proposal stride."""
    t = model.transformer
    cells = math.ceil(side / model.backbone.strides[0])
    weight = next(p for p in t.parameters())
    memory = torch.zeros(1, cells * cells, t.d_model, device=weight.device, dtype=weight.dtype)
    mask = torch.zeros(1, cells * cells, dtype=torch.bool, device=weight.device)
    return int(t.gen_encoder_output_proposals(memory, mask, [(cells, cells)])[1].shape[1])


def check_image_sizes(model: PlainDETR, sizes: dict[str, tuple[int, int]]) -> None:
    """Every image a two-stage detector sees must give it a proposal per query: `sizes` maps a config key to
    (the short side it sets, the queries that run then). A one-line error naming the key otherwise (officially a
    topk error deep in the forward)."""
    if not model.two_stage:
        return
    for key, (side, queries) in sizes.items():
        try:
            found = num_proposals(model, side)
        except ValueError as e:
            raise ConfigError(f"{key}={side}: {e}") from None
        if found < queries:
            raise ConfigError(f"{key}={side}: a {side}-px image gives {found} proposals, fewer than the {queries} queries "
                              "(decoder_head.num_queries_one2one + num_queries_one2many in training): use larger images "
                              "or fewer queries")
