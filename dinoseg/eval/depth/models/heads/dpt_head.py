"""DPT depth head (Ranftl et al., "Vision Transformers for Dense Prediction"), with the official key names.

Four backbone layers are reassembled into a feature pyramid at strides 4, 8, 16 and 32 of the patch grid's
pixels (transposed convs x4 / x2, identity, stride-2 conv), fused from the coarsest level down by residual
conv units with 2x upsampling, and turned into depth logits by a small conv head that upsamples twice more:
the output has 16 x 16 pixels per patch.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .....layers.deterministic import resize_bilinear


class ConvModule(nn.Module):
    """Conv2d with an optional ReLU, before it (`act_first`, pre-activation) or after it. Key: ``conv.*``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        bias: bool = True,
        activate: bool = True,
        act_first: bool = False,
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self.activate = nn.ReLU() if activate else None
        self.act_first = act_first
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activate is not None and self.act_first:
            x = self.activate(x)
        x = self.conv(x)
        if self.activate is not None and not self.act_first:
            x = self.activate(x)
        return x


class Interpolate(nn.Module):
    def __init__(self, scale_factor: float, mode: str, align_corners: bool = False):
        super().__init__()
        self.scale_factor = scale_factor
        self.mode = mode
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bilinear" and float(self.scale_factor).is_integer():  # (deterministic on CUDA when asked)
            size = (x.shape[-2] * int(self.scale_factor), x.shape[-1] * int(self.scale_factor))
            return resize_bilinear(x, size, self.align_corners)
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners)


class UpConvHead(nn.Module):
    """conv3x3 (features -> features / 2), 2x bilinear upsampling, conv3x3 -> hidden, ReLU, conv1x1 -> outputs."""

    def __init__(self, features: int, n_output_channels: int, n_hidden_channels: int = 32):
        super().__init__()
        self.n_output_channels = n_output_channels
        self.head = nn.Sequential(
            nn.Conv2d(features, features // 2, kernel_size=3, padding=1),
            Interpolate(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, n_hidden_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hidden_channels, n_output_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class ReassembleBlocks(nn.Module):
    """Per layer: class-token readout, optional BatchNorm, 1x1 projection, then the resize of its pyramid level
    (x4 transposed conv, x2 transposed conv, identity, stride-2 conv)."""

    def __init__(
        self,
        in_channels: Sequence[int] = (1024, 1024, 1024, 1024),
        out_channels: Sequence[int] = (128, 256, 512, 1024),
        readout_type: str = "project",
        use_batchnorm: bool = False,
    ):
        super().__init__()
        if readout_type not in ("ignore", "add", "project"):
            raise ValueError(f"readout_type must be 'ignore', 'add' or 'project', got {readout_type!r}")
        self.readout_type = readout_type
        self.projects = nn.ModuleList(
            ConvModule(in_channels[i], c, kernel_size=1, activate=False) for i, c in enumerate(out_channels)
        )
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        if readout_type == "project":
            self.readout_projects = nn.ModuleList(
                nn.Sequential(nn.Linear(2 * c, c), nn.GELU()) for c in in_channels[: len(out_channels)]
            )
        self.batchnorm_layers = nn.ModuleList(
            nn.BatchNorm2d(c) if use_batchnorm else nn.Identity() for c in in_channels[: len(out_channels)]
        )

    def forward(self, inputs) -> list[torch.Tensor]:
        out = []
        for i, (x, cls_token) in enumerate(inputs):
            if self.readout_type == "project":
                tokens = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
                readout = cls_token[:, None, :].expand_as(tokens)
                tokens = self.readout_projects[i](torch.cat((tokens, readout), dim=-1))
                x = tokens.transpose(1, 2).reshape(x.shape)
            elif self.readout_type == "add":
                x = x + cls_token[:, :, None, None]
            x = self.batchnorm_layers[i](x)
            x = self.projects[i](x)
            out.append(self.resize_layers[i](x))
        return out


class PreActResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))) with 3x3 convs."""

    def __init__(self, in_channels: int, bias: bool = False):
        super().__init__()
        self.conv1 = ConvModule(in_channels, in_channels, 3, padding=1, bias=bias, act_first=True)
        self.conv2 = ConvModule(in_channels, in_channels, 3, padding=1, bias=bias, act_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class FeatureFusionBlock(nn.Module):
    """Adds the residual-refined skip feature (if any) to the running feature, refines the sum, upsamples it
    (bilinear) and projects it (1x1 conv)."""

    def __init__(
        self,
        in_channels: int,
        align_corners: bool = True,
        bias: bool = False,
        with_skip: bool = True,
        legacy_resize: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.align_corners = align_corners
        self.legacy_resize = legacy_resize
        self.project = ConvModule(in_channels, in_channels, kernel_size=1, activate=False)
        self.res_conv_unit1 = PreActResidualConvUnit(in_channels, bias=bias) if with_skip else None
        self.res_conv_unit2 = PreActResidualConvUnit(in_channels, bias=bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size=None) -> torch.Tensor:
        """`size`: the output size (the next skip feature's); None doubles the input size."""
        if skip is not None:
            if x.shape[-2:] != skip.shape[-2:]:
                if self.legacy_resize:  # the official rule: the skip feature is stretched to the running one
                    skip = resize_bilinear(skip, x.shape[-2:])
                else:
                    x = resize_bilinear(x, skip.shape[-2:])
            x = x + self.res_conv_unit1(skip)
        x = self.res_conv_unit2(x)
        size = (2 * x.shape[-2], 2 * x.shape[-1]) if size is None else tuple(size)
        x = resize_bilinear(x, size, self.align_corners)
        return self.project(x)


class DPTHead(nn.Module):
    """DPT decoder on four backbone layers (or one layer, used at all four pyramid levels).

    Args:
        in_channels: channels of the backbone layers (4 entries, or 1 to feed the same layer to every level).
        channels: width of the fusion path.
        post_process_channels: channels of the four pyramid levels (times 2**level with `expand_channels`).
        readout_type: use of the class token: "ignore", "add" or "project" (Linear(2C, C) + GELU).
        n_output_channels: depth bins (1: regression), `n_hidden_channels`: hidden width of the output head.
        use_batchnorm: BatchNorm on each layer's features before the projection.
        use_bias: biases in the residual conv units; projection_after_fusion: a 3x3 conv + ReLU after fusion.
        legacy_fusion_resize: resize as the official code does: each skip feature is resized to the running
            feature, so an odd patch grid gives a map larger than the (padded) input and stretched
            (16 * 2 * ceil(h / 2) pixels for h patches). The default resizes the running feature to each skip
            feature instead: the map always has 16 x 16 pixels per patch. Both agree on even patch grids.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (1024, 1024, 1024, 1024),
        channels: int = 256,
        post_process_channels: Sequence[int] = (128, 256, 512, 1024),
        readout_type: str = "project",
        expand_channels: bool = False,
        n_output_channels: int = 256,
        n_hidden_channels: int = 32,
        use_batchnorm: bool = False,
        use_bias: bool = False,
        projection_after_fusion: bool = True,
        *,
        legacy_fusion_resize: bool = False,
    ):
        super().__init__()
        in_channels = [in_channels] if isinstance(in_channels, int) else list(in_channels)
        post_process_channels = list(post_process_channels)
        if len(post_process_channels) != 4:
            raise ValueError(f"DPTHead: post_process_channels needs 4 entries (one per level), got {post_process_channels}")
        if len(in_channels) == 1:
            in_channels = in_channels * 4  # one backbone layer feeds every pyramid level
        if len(in_channels) != 4:
            raise ValueError(f"DPTHead: in_channels needs 1 or 4 entries (backbone layers), got {in_channels}")
        self.in_channels = in_channels
        self.channels = channels
        self.n_output_channels = n_output_channels
        self.n_hidden_channels = n_hidden_channels
        self.expand_channels = expand_channels
        self.legacy_fusion_resize = legacy_fusion_resize
        self.post_process_channels = [c * 2**i if expand_channels else c for i, c in enumerate(post_process_channels)]
        self.reassemble_blocks = ReassembleBlocks(in_channels, self.post_process_channels, readout_type, use_batchnorm)
        self.convs = nn.ModuleList(
            ConvModule(c, channels, kernel_size=3, padding=1, bias=False, activate=False)
            for c in self.post_process_channels
        )
        self.fusion_blocks = nn.ModuleList(
            FeatureFusionBlock(channels, bias=use_bias, with_skip=i > 0, legacy_resize=legacy_fusion_resize)
            for i in range(4)
        )
        self.project = ConvModule(channels, channels, kernel_size=3, padding=1) if projection_after_fusion else nn.Identity()
        self.conv_depth = UpConvHead(channels, n_output_channels, n_hidden_channels)

    def forward_features(self, inputs) -> torch.Tensor:
        inputs = list(inputs)
        if len(inputs) == 1:
            inputs = inputs * 4
        if len(inputs) != 4:
            raise ValueError(f"DPTHead: expected 1 or 4 backbone layers, got {len(inputs)}")
        levels = [conv(x) for conv, x in zip(self.convs, self.reassemble_blocks(inputs))]  # fine -> coarse
        out = None
        for i, block in enumerate(self.fusion_blocks):
            level = len(levels) - 1 - i
            skip = levels[level] if i > 0 else None
            x = levels[level] if i == 0 else out
            next_size = None if (self.legacy_fusion_resize or level == 0) else levels[level - 1].shape[-2:]
            out = block(x, skip, size=next_size)
        return self.project(out)

    def forward(self, inputs) -> torch.Tensor:
        """Logits [B, n_output_channels, 16 h, 16 w] for a patch grid h x w."""
        return self.conv_depth(self.forward_features(inputs))

    def predict(self, inputs, rescale_to=(512, 512)) -> torch.Tensor:
        """Logits resized (bilinear) to `rescale_to`."""
        return F.interpolate(self.forward(inputs), size=tuple(rescale_to), mode="bilinear")
