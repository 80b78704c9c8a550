"""The segmentation heads a run can train and evaluate, one entry per `decoder_head.type`.

Each entry owns what differs between heads: which config values its builder takes, its training loss, and how
many classes a head checkpoint of its kind holds. Everything else treats heads alike.
"""

import torch
from omegaconf import DictConfig, OmegaConf

from ...data.datasets.base import IGNORE_INDEX
from ...engine.config import ConfigError
from ...layers.deterministic import resize_bilinear
from .loss import MultiSegmentationLoss
from .m2f_loss import Mask2FormerLoss
from .models import DecoderType, Mask2FormerOptions


class LinearDecoder:
    """BatchNorm + 1x1 conv on the backbone's patch features, trained with Dice + cross-entropy."""

    @staticmethod
    def builder_args(head: DictConfig) -> dict:
        return dict(dropout=head.dropout, use_batchnorm=head.use_batchnorm, use_cls_token=head.use_cls_token)

    @staticmethod
    def criterion(train: DictConfig, num_classes: int) -> torch.nn.Module:
        return MultiSegmentationLoss(diceloss_weight=train.diceloss_weight, celoss_weight=train.celoss_weight,
                                     ignore_index=IGNORE_INDEX)

    @staticmethod
    def loss(criterion, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Logits live on the patch grid: upsample them to the label resolution, in float32.
        logits = resize_bilinear(outputs.float(), labels.shape[-2:])
        return criterion(logits, labels)

    @staticmethod
    def num_classes(head_state_dict: dict) -> int | None:
        weight = head_state_dict.get("segmentation_model.1.conv.weight")
        return None if weight is None else int(weight.shape[0])


class Mask2FormerDecoder:
    """ViT-Adapter + Mask2Former, trained with the Hungarian-matched mask-classification loss."""

    @staticmethod
    def builder_args(head: DictConfig) -> dict:
        options: Mask2FormerOptions = OmegaConf.to_object(head.m2f)
        return dict(hidden_dim=head.hidden_dim, m2f_options=options)

    @staticmethod
    def criterion(train: DictConfig, num_classes: int) -> torch.nn.Module:
        return Mask2FormerLoss(num_classes=num_classes, ignore_index=IGNORE_INDEX,
                               **OmegaConf.to_container(train.m2f_loss, resolve=True))

    @staticmethod
    def loss(criterion, outputs: dict, labels: torch.Tensor) -> torch.Tensor:
        loss, _ = criterion(outputs, labels)
        return loss

    @staticmethod
    def num_classes(head_state_dict: dict) -> int | None:
        weight = head_state_dict.get("segmentation_model.1.predictor.class_embed.weight")
        return None if weight is None else int(weight.shape[0]) - 1  # the last class is "no object"


DECODERS = {DecoderType.LINEAR: LinearDecoder, DecoderType.M2F: Mask2FormerDecoder}


def decoder(head: DictConfig):
    """The registry entry of `decoder_head.type`."""
    return DECODERS[DecoderType(head.type)]


def resolve_num_classes(head: DictConfig, *, head_state_dict: dict | None = None, dataset=None) -> int:
    """The one rule for the number of classes: `decoder_head.num_classes` when set (a head checkpoint must agree
    with it), else the head checkpoint's, else the dataset's."""
    configured = head.num_classes
    from_head = decoder(head).num_classes(head_state_dict) if head_state_dict is not None else None
    if configured is not None and from_head is not None and configured != from_head:
        raise ConfigError(f"decoder_head.num_classes={configured}: the head checkpoint has {from_head} classes")
    for value in (configured, from_head, getattr(dataset, "num_classes", None)):
        if value is not None:
            return int(value)
    raise ConfigError("decoder_head.num_classes: cannot infer it from the head checkpoint or the dataset; set it")


def head_type_of(head_state_dict: dict) -> DecoderType | None:
    """The segmentation head a checkpoint holds, from its keys (None: neither a linear nor a Mask2Former head)."""
    for kind, entry in DECODERS.items():
        if entry.num_classes(head_state_dict) is not None:
            return kind
    return None
