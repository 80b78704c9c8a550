"""Builders shared by train / eval / predict: backbone, segmentor, datasets and transforms from the config."""

import contextlib
import inspect

import torch
from omegaconf import DictConfig, OmegaConf

from ...data import DATASETS, make_dataset, parse_dataset_str
from ...hub.backbones import ARCHS, CONVNEXT_ARCHS, load_backbone_weights, make_backbone
from ...models.vision_transformer import DinoVisionTransformer
from ..utils import freeze_backbone
from .config import ConfigError, InferenceMode, Precision
from .inference import AccumulatorBuffer
from .models import build_segmentation_decoder
from .transforms import make_segmentation_eval_transforms, make_segmentation_train_transforms

AUTOCAST_DTYPES = {Precision.FLOAT32: torch.float32, Precision.BFLOAT16: torch.bfloat16,
                   Precision.FLOAT16: torch.float16}


@contextlib.contextmanager
def _seeded(seed: int):
    # Random backbone weights must be the same in train, eval and predict: draw them from a fixed seed
    # without disturbing the caller's RNG stream.
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def build_backbone(model_cfg: DictConfig) -> torch.nn.Module:
    kwargs = OmegaConf.to_container(model_cfg.backbone_kwargs, resolve=True)
    weights = model_cfg.pretrained_weights
    with _seeded(model_cfg.random_init_seed):
        if model_cfg.dino_hub is None:
            if weights:
                backbone = DinoVisionTransformer(**kwargs, device="meta")  # weights are assigned, not copied
                load_backbone_weights(backbone, weights)
            else:
                backbone = DinoVisionTransformer(**kwargs)
        else:
            if model_cfg.dino_hub not in ARCHS and model_cfg.dino_hub not in CONVNEXT_ARCHS:
                raise ConfigError(f"model.dino_hub={model_cfg.dino_hub!r}: expected one of "
                                  f"{sorted(ARCHS) + sorted(CONVNEXT_ARCHS)}")
            backbone = make_backbone(model_cfg.dino_hub, pretrained=weights is not None,
                                     weights=weights if weights else "LVD1689M", **kwargs)
    return freeze_backbone(backbone)


def build_model(cfg: DictConfig, num_classes: int, backbone=None):
    backbone = backbone if backbone is not None else build_backbone(cfg.model)
    head = cfg.decoder_head
    options = {}
    if head.type == "m2f":
        options = OmegaConf.to_container(head.m2f, resolve=True)
        options.update(options.pop("adapter"))
    return build_segmentation_decoder(
        backbone,
        backbone_out_layers=head.backbone_out_layers,
        decoder_type=head.type,
        hidden_dim=head.hidden_dim,
        num_classes=num_classes,
        autocast_dtype=AUTOCAST_DTYPES[Precision(cfg.precision)],
        dropout=head.dropout,
        use_batchnorm=head.use_batchnorm,
        use_cls_token=head.use_cls_token,
        **options,
    )


def dataset_descriptor(descriptor: str, root: str | None) -> str:
    """Append the shared `datasets.root` to a descriptor that has none, when its dataset type takes a root."""
    if not root or ":root=" in descriptor:
        return descriptor
    kind = parse_dataset_str(descriptor)["type"].strip().lower().replace("_", "").replace("-", "")
    cls = DATASETS.get(kind)
    if cls is not None and "root" not in inspect.signature(cls.__init__).parameters:
        return descriptor  # e.g. the synthetic set
    return f"{descriptor}:root={root}"


def build_train_dataset(cfg: DictConfig):
    t = cfg.transforms
    transforms = make_segmentation_train_transforms(
        img_size=t.train.img_size,
        random_img_size_ratio_range=tuple(t.train.random_img_size_ratio_range),
        crop_size=t.train.crop_size,
        flip_prob=t.train.flip_prob,
        cat_max_ratio=t.train.cat_max_ratio,
        photometric=t.train.photometric_distortion,
        mean=tuple(t.mean),
        std=tuple(t.std),
    )
    return make_dataset(dataset_descriptor(cfg.datasets.train, cfg.datasets.root), transforms=transforms)


def build_eval_transforms(cfg: DictConfig):
    t = cfg.transforms
    return make_segmentation_eval_transforms(img_size=t.eval.img_size, mean=tuple(t.mean), std=tuple(t.std))


def build_val_dataset(cfg: DictConfig):
    return make_dataset(dataset_descriptor(cfg.datasets.val, cfg.datasets.root), transforms=build_eval_transforms(cfg))


def inference_kwargs(cfg: DictConfig) -> dict:
    """Keyword arguments of `make_tta_inference` for this config, for one loop over images: its
    `AccumulatorBuffer` gives every image's sliding-window accumulator the same memory."""
    e = cfg.eval
    return dict(
        tta_ratios=tuple(cfg.transforms.eval.tta_ratios) if e.use_tta else (1.0,),
        use_flip=bool(e.use_tta),
        inference_mode=InferenceMode(e.mode).value,
        crop_size=(e.crop_size, e.crop_size),
        stride=(e.stride, e.stride),
        crop_batch_size=e.crop_batch_size,
        buffer=AccumulatorBuffer(),
    )


def build_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (the frozen backbone has none)."""
    o = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
