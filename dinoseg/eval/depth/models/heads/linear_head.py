"""Linear depth head: a 1x1 convolution on the concatenated (multi-layer) patch features."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """Per-pixel linear map from backbone features to `n_output_channels` depth logits (or one depth value).

    Input: one ``(patch map [B, C_i, h, w], class token [B, C_i])`` pair per backbone layer (what the depther's
    encoder returns). Each map is followed by its class token broadcast over the grid when `use_cls_token`;
    the maps are resized (bilinear) to the grid of the first one and concatenated, then BatchNorm (optional)
    and the 1x1 conv ``conv_depth``. `batchnorm_layer` is a plain `nn.BatchNorm2d`: the training engine turns
    it into a synchronised one under DDP with the same key names as the official `SyncBatchNorm`.
    """

    def __init__(
        self,
        in_channels: Sequence[int] | int,
        n_output_channels: int,
        input_transform: str = "resize",
        align_corners: bool = False,
        use_batchnorm: bool = False,
        use_cls_token: bool = True,
    ):
        super().__init__()
        in_channels = [in_channels] if isinstance(in_channels, int) else list(in_channels)
        if not in_channels or any(c <= 0 for c in in_channels):
            raise ValueError(f"LinearHead: in_channels must be a non-empty list of positive ints, got {in_channels}")
        if n_output_channels <= 0:
            raise ValueError(f"LinearHead: n_output_channels must be positive, got {n_output_channels}")
        self.in_channels = in_channels
        self.channels = sum(in_channels) * (2 if use_cls_token else 1)
        self.input_transform = input_transform
        self.align_corners = align_corners
        self.n_output_channels = n_output_channels
        self.use_cls_token = use_cls_token
        self.batchnorm_layer = nn.BatchNorm2d(self.channels) if use_batchnorm else nn.Identity()
        self.conv_depth = nn.Conv2d(self.channels, n_output_channels, kernel_size=1)
        nn.init.normal_(self.conv_depth.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_depth.bias)

    def _features(self, inputs) -> torch.Tensor:
        inputs = list(inputs)
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"LinearHead: expected {len(self.in_channels)} feature maps, got {len(inputs)}")
        maps = []
        for i, item in enumerate(inputs):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"LinearHead: input {i} must be a (patch map, class token) pair")
            x, cls_token = item
            if x.ndim == 2:  # a global feature vector acts as a 1x1 map
                x = x[:, :, None, None]
            if self.use_cls_token:
                x = torch.cat((x, cls_token[:, :, None, None].expand_as(x)), dim=1)
            maps.append(x)
        if "resize" in self.input_transform:
            size = maps[0].shape[-2:]
            maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=self.align_corners) for m in maps]
        return torch.cat(maps, dim=1)

    def forward(self, inputs) -> torch.Tensor:
        """Logits [B, n_output_channels, h, w] on the patch grid of the first layer."""
        return self.conv_depth(self.batchnorm_layer(self._features(inputs)))

    def predict(self, inputs, rescale_to=(512, 512)) -> torch.Tensor:
        """Logits resized (bilinear) to `rescale_to`."""
        return F.interpolate(self.forward(inputs), size=tuple(rescale_to), mode="bilinear")
