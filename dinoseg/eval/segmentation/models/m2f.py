"""Builds the ViT-Adapter + Mask2Former pair used by ``build_segmentation_decoder(decoder_type="m2f")``."""

from collections.abc import Sequence

from torch import nn

from .backbone.dinov3_adapter import DINOv3_Adapter
from .heads.mask2former_head import Mask2FormerHead


def build_m2f_modules(
    backbone_model: nn.Module,
    interaction_indexes: Sequence[int],
    hidden_dim: int = 2048,
    num_classes: int = 150,
    *,
    num_queries: int = 100,
    nheads: int = 16,
    dim_feedforward: int = 4096,
    enc_layers: int = 6,
    dec_layers: int = 9,
    pixel_decoder_nheads: int = 16,
    **adapter_options,
) -> tuple[DINOv3_Adapter, Mask2FormerHead]:
    """Returns ``(adapter, head)``: ``head(adapter(images))`` gives Mask2Former outputs.

    Args:
        backbone_model: a DINOv3 ViT; the adapter freezes it.
        interaction_indexes: backbone blocks the adapter reads (4 of them, e.g. ``FOUR_EVEN_INTERVALS``).
        hidden_dim, num_classes, num_queries, nheads, dim_feedforward, enc_layers, dec_layers,
            pixel_decoder_nheads: head sizes (defaults: the official head).
        adapter_options: extra :class:`DINOv3_Adapter` keywords (``conv_inplane``, ``n_points``,
            ``deform_num_heads``, ``drop_path_rate``, ``with_cffn``, ``cffn_ratio``, ``deform_ratio``,
            ``add_vit_feature``, ``use_extra_extractor``, ``with_cp``, ``norm_layer``).

    Module and parameter names match the official checkpoints once placed in
    ``nn.ModuleList([adapter, head])``.
    """
    adapter = DINOv3_Adapter(backbone_model, interaction_indexes=list(interaction_indexes), **adapter_options)
    head = Mask2FormerHead(
        in_channels=adapter.embed_dim,
        hidden_dim=hidden_dim,
        num_classes=num_classes,
        num_queries=num_queries,
        nheads=nheads,
        dim_feedforward=dim_feedforward,
        enc_layers=enc_layers,
        dec_layers=dec_layers,
        pixel_decoder_nheads=pixel_decoder_nheads,
    )
    return adapter, head
