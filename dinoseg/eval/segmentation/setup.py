"""From a segmentation config to the objects a run uses; below this file, functions take values, not the config."""

import torch
from omegaconf import DictConfig

from ...data import make_dataset
from ...engine.adaptation import adapt_for_head, adapt_for_training, build_frozen_backbone, optimizer_groups
from ...engine.config import ConfigError, Precision
from ...engine.optim import build_optimizer as _build_optimizer
from ..utils import BackboneLayersSet, get_backbone_out_indices
from .decoders import decoder
from .inference import InferenceMode, InferenceSettings
from .models import DecoderType, FeatureDecoder, build_segmentation_decoder, build_segmentor_with_head


def build_backbone(cfg: DictConfig) -> torch.nn.Module:
    """The frozen backbone of `model` (before any `model.finetune` adaptation)."""
    return build_frozen_backbone(cfg.model)


def adapt_backbone(cfg: DictConfig, backbone: torch.nn.Module) -> torch.nn.Module:
    """`backbone` adapted as `model.finetune` says, for training the configured head: blocks past the deepest one it
    reads (`decoder_head.backbone_out_layers`) never run, so they are neither adapted nor trained."""
    try:
        last = max(get_backbone_out_indices(backbone.n_blocks, BackboneLayersSet(cfg.decoder_head.backbone_out_layers)))
    except ValueError as e:  # FOUR_* on a backbone of fewer than 4 blocks
        raise ConfigError(f"decoder_head: {e}") from None
    return adapt_for_training(backbone, cfg.model, last_read_block=last, seed=cfg.seed)


def _decoder_args(cfg: DictConfig, num_classes: int) -> dict:
    head = cfg.decoder_head
    return dict(backbone_out_layers=head.backbone_out_layers, decoder_type=head.type, num_classes=num_classes,
                autocast_dtype=Precision(cfg.precision).dtype, **decoder(head).builder_args(head))


def build_model(cfg: DictConfig, num_classes: int, backbone=None) -> FeatureDecoder:
    """The configured segmentor with a freshly initialised head, its backbone adapted as `model.finetune` says."""
    backbone = adapt_backbone(cfg, backbone if backbone is not None else build_backbone(cfg))
    try:
        return build_segmentation_decoder(backbone, **_decoder_args(cfg, num_classes))
    except ValueError as e:  # a head option the backbone cannot take (Mask2Former on one ConvNeXt stage...)
        raise ConfigError(f"decoder_head: {e}") from None


def build_model_with_head(cfg: DictConfig, num_classes: int, head: str) -> FeatureDecoder:
    """The configured segmentor for inference, its head loaded strictly from the checkpoint `head` (with its
    backbone adapted as the checkpoint records); with `model.weights_dtype` half, the head is stored in half
    precision too."""
    dtype = Precision(cfg.model.weights_dtype).dtype
    backbone = build_backbone(cfg)
    backbone = adapt_for_head(backbone, cfg.model, head)
    try:
        return build_segmentor_with_head(backbone, head, source=head, dtype=dtype, **_decoder_args(cfg, num_classes))
    except ValueError as e:
        raise ConfigError(f"decoder_head: {e}") from None


def build_train_dataset(cfg: DictConfig):
    # The transforms (torchvision, whose import takes a second or more) are imported when first built, so that
    # loading and checking a config does not wait for them.
    from .transforms import make_segmentation_train_transforms

    t = cfg.transforms
    transforms = make_segmentation_train_transforms(
        img_size=t.train.img_size,
        random_img_size_ratio_range=tuple(t.train.random_img_size_ratio_range),
        crop_size=t.train.crop_size,
        flip_prob=t.train.flip_prob,
        cat_max_ratio=t.train.cat_max_ratio,
        photometric={"hue_range": tuple(t.train.hue_range)} if t.train.photometric_distortion else False,
        mean=tuple(t.mean),
        std=tuple(t.std),
    )
    return make_dataset(cfg.datasets.train, transforms=transforms, default_root=cfg.datasets.root)


def build_eval_transforms(cfg: DictConfig):
    from .transforms import make_single_view_eval_transforms

    t = cfg.transforms
    # With TTA every scale is resized from the original image (the official rule), so the image stays as it is.
    img_size = None if cfg.eval.use_tta else t.eval.img_size
    return make_single_view_eval_transforms(img_size, mean=tuple(t.mean), std=tuple(t.std))


def build_val_dataset(cfg: DictConfig):
    return make_dataset(cfg.datasets.val, transforms=build_eval_transforms(cfg), default_root=cfg.datasets.root)


def inference_settings(cfg: DictConfig) -> InferenceSettings:
    e = cfg.eval
    return InferenceSettings(
        mode=InferenceMode(e.mode),
        crop_size=(e.crop_size, e.crop_size),
        stride=(e.stride, e.stride),
        crop_batch_size=e.crop_batch_size,
        tta_ratios=tuple(cfg.transforms.eval.tta_ratios) if e.use_tta else (1.0,),
        use_flip=bool(e.use_tta),
        small_size=cfg.transforms.eval.img_size if e.use_tta else None,
        decoder_head_type=DecoderType(cfg.decoder_head.type).value,
    )


def build_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.AdamW:
    o, f = cfg.optimizer, cfg.model.finetune
    groups = optimizer_groups(model, o.weight_decay, lr_multiplier=f.lr_multiplier, layer_decay=f.layer_decay)
    return _build_optimizer(model, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, param_groups=groups)
