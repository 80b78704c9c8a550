"""The Mask2Former input pyramid of a hierarchical backbone (a DINOv3 ConvNeXt): its four stages as they are.

Mask2Former reads the stride 4/8/16/32 features of a hierarchical backbone (ResNet, Swin) directly; a plain ViT
needs the ViT-Adapter to build such a pyramid. A ConvNeXt already has one, so this module only runs the frozen
backbone and names its stages the way the adapter names its outputs (`{"1".."4"}`), so `Mask2FormerHead` and the
Mask2Former training loss work unchanged. It has no parameters of its own: everything trainable is in the head.
"""


import torch
import torch.nn.functional as F
from torch import nn

from dinoseg.models.frozen import backbone_grad_mode, freeze_backbone, set_backbone_mode
from dinoseg.models.precision import backbone_autocast

STAGES = (0, 1, 2, 3)
STRIDES = (4, 8, 16, 32)


class ConvNeXtPyramid(nn.Module):
    """Frozen ConvNeXt -> `{"1": stride 4, "2": stride 8, "3": stride 16, "4": stride 32}`.

    Args:
        backbone: a backbone with four stages at strides 4..32 and per-stage widths `embed_dims` (a DINOv3
            `ConvNeXt`, without pseudo patch size); frozen here.
        interaction_indexes: the stages to read; Mask2Former needs all four, `[0, 1, 2, 3]`.
        backbone_dtype: autocast dtype of the backbone alone, as the ViT-Adapter's (float32: no autocast); None: the
            caller's autocast.

    Inputs of any size are zero-padded at the bottom/right to a multiple of 32 (Mask2Former's size divisibility)
    and each level cropped back to `ceil(side / stride)`, the sizes the ViT-Adapter gives. Level i has
    `embed_dims[i]` channels; the last stage is normalised by the backbone's final LayerNorm (`norm=True`, as
    for the linear head), the others are the raw stage outputs.
    """

    size_divisor = STRIDES[-1]
    patch_size = None  # no patch grid: inputs are padded to the coarsest stride

    def __init__(self, backbone: nn.Module, interaction_indexes=STAGES, *, backbone_dtype: torch.dtype | None = None):
        super().__init__()
        if list(interaction_indexes) != list(STAGES):
            raise ValueError(
                f"Mask2Former on a ConvNeXt reads its four stages {list(STAGES)} (backbone_out_layers FOUR_LAST or "
                f"FOUR_EVEN_INTERVALS), got {list(interaction_indexes)}"
            )
        if getattr(backbone, "patch_size", None) is not None:
            raise ValueError(
                f"Mask2Former on a ConvNeXt reads its stride 4..32 stages; build the ConvNeXt without a pseudo "
                f"patch_size (got {backbone.patch_size}, which would resize them all to one grid; from a config: "
                f"model.backbone_kwargs.patch_size=null)"
            )
        self.backbone = freeze_backbone(backbone)
        self.embed_dims = list(backbone.embed_dims)
        self.backbone_dtype = backbone_dtype

    def train(self, mode: bool = True):
        super().train(mode)
        set_backbone_mode(self.backbone, mode)  # eval mode, but for the stages an adaptation trains
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        H, W = x.shape[-2:]
        d = self.size_divisor
        # Padded unconditionally (a no-op for aligned sizes) and rounded up with non-negative integer division
        # only, as the ViT-Adapter does: an exported graph (symbolic sizes) then pads whatever its input size is.
        x = F.pad(x, (0, (W + d - 1) // d * d - W, 0, (H + d - 1) // d * d - H))
        # A frozen backbone builds no autograd graph; backbone_dtype float32 turns autocast off around it.
        with backbone_grad_mode(self.backbone), backbone_autocast(x.device.type, self.backbone_dtype):
            maps = self.backbone.get_intermediate_layers(x, n=list(STAGES), reshape=True, norm=True)
        return {
            str(level + 1): fmap[..., : (H + stride - 1) // stride, : (W + stride - 1) // stride]
            for level, (fmap, stride) in enumerate(zip(maps, STRIDES))
        }
