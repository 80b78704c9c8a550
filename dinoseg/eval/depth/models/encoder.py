"""The backbone side of a depther: patch-size adaptation, then the chosen blocks of a frozen DINOv3 ViT."""

import logging
from collections.abc import Sequence
from enum import Enum

import torch
from torch import nn

from dinoseg.eval.utils import BackboneLayersSet, freeze_backbone, get_backbone_out_indices, parse_enum
from dinoseg.models.frozen import set_backbone_mode

from .embed import CenterPadding, DropRemainder, StretchToMultiple

logger = logging.getLogger("dinoseg")

__all__ = ["BackboneLayersSet", "DinoVisionTransformerWrapper", "PatchSizeAdaptationStrategy", "backbone_out_indices"]


class PatchSizeAdaptationStrategy(Enum):
    CENTER_PADDING = "center_padding"  # zero-pad to a multiple of the patch size
    STRETCH = "stretch"  # resize (bilinear) to a multiple of the patch size
    NO_ADAPTATION = "never"  # the rows / columns past the last whole patch are dropped

    @classmethod
    def parse(cls, value: "PatchSizeAdaptationStrategy | str") -> "PatchSizeAdaptationStrategy":
        """A member, its name or its value, case-insensitive."""
        return parse_enum(cls, value, "adapt_to_patch_size")


def backbone_out_indices(n_blocks: int, layers: Sequence[int] | BackboneLayersSet | str) -> list[int]:
    """Block indices from a `BackboneLayersSet` (member or name) or an explicit list, checked against the depth."""
    if isinstance(layers, (str, BackboneLayersSet)):
        try:
            layers = BackboneLayersSet(layers.upper()) if isinstance(layers, str) else layers
        except ValueError:
            raise ValueError(
                f"unknown backbone_out_layers {layers!r}; expected a list of block indices or one of "
                f"{[m.value for m in BackboneLayersSet]}"
            ) from None
        return get_backbone_out_indices(n_blocks, layers)
    indices = [int(i) for i in layers]
    if not indices or any(not 0 <= i < n_blocks for i in indices):
        raise ValueError(f"backbone_out_layers {list(layers)} must be block indices in [0, {n_blocks - 1}]")
    return indices


class DinoVisionTransformerWrapper(nn.Module):
    """Frozen backbone returning ``[(patch features [B, C, h, w], class token [B, C]), ...]`` for the chosen
    blocks, after adapting the input to the patch size. Its only weights are ``backbone.*`` (the official
    ``encoder.backbone.*`` keys of a depther)."""

    def __init__(
        self,
        backbone_model: nn.Module,
        backbone_out_layers: str | Sequence[int] | BackboneLayersSet,
        use_backbone_norm: bool = False,
        adapt_to_patch_size: PatchSizeAdaptationStrategy | str = PatchSizeAdaptationStrategy.CENTER_PADDING,
    ):
        super().__init__()
        n_blocks = getattr(backbone_model, "n_blocks", None)
        if n_blocks is None:
            raise ValueError(f"backbone {type(backbone_model).__name__} has no `n_blocks` attribute")
        self.final_norm = use_backbone_norm
        self.backbone = freeze_backbone(backbone_model)
        self.backbone_out_indices = backbone_out_indices(n_blocks, backbone_out_layers)
        embed_dims = getattr(backbone_model, "embed_dims", None) or [backbone_model.embed_dim] * n_blocks
        self.embed_dims = [embed_dims[i] for i in self.backbone_out_indices]
        multiple = getattr(backbone_model, "input_pad_size", None) or backbone_model.patch_size
        strategy = PatchSizeAdaptationStrategy.parse(adapt_to_patch_size)
        self.patch_size_adapter: nn.Module = {
            PatchSizeAdaptationStrategy.CENTER_PADDING: lambda: CenterPadding(multiple),
            PatchSizeAdaptationStrategy.STRETCH: lambda: StretchToMultiple(multiple),
            PatchSizeAdaptationStrategy.NO_ADAPTATION: lambda: DropRemainder(multiple),
        }[strategy]()

    def train(self, mode: bool = True):
        super().train(mode)
        set_backbone_mode(self.backbone, mode)  # frozen: in eval mode, but for the blocks an adaptation trains
        return self

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = self.patch_size_adapter(x)
        return list(
            self.backbone.get_intermediate_layers(
                x, n=self.backbone_out_indices, reshape=True, return_class_token=True, norm=self.final_norm
            )
        )
