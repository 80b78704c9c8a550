"""Linear segmentation head on frozen backbone features (the official DINOv3 "linear" decoder)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """Per-pixel linear classifier on (multi-layer) patch features.

    The feature maps of all layers are resized to the grid of the first one and concatenated along channels
    (each one followed by its class token broadcast over the grid when `use_cls_token`), then
    [dropout (training only)] -> BatchNorm -> 1x1 conv, in the official order.

    `batchnorm_layer` is a plain `nn.BatchNorm2d`: under DDP the training engine converts it with
    `nn.SyncBatchNorm.convert_sync_batchnorm`, which keeps the key names of the official checkpoints.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        n_output_channels: int,
        use_batchnorm: bool = True,
        use_cls_token: bool = False,
        dropout: float = 0.1,
    ):
        super().__init__()
        in_channels = [in_channels] if isinstance(in_channels, int) else list(in_channels)
        if not in_channels or any(c <= 0 for c in in_channels):
            raise ValueError(
                f"LinearHead: in_channels must be a non-empty list of positive ints, got {in_channels}"
            )
        if n_output_channels <= 0:
            raise ValueError(f"LinearHead: n_output_channels must be positive, got {n_output_channels}")
        self.in_channels = in_channels
        self.use_cls_token = use_cls_token
        self.channels = sum(in_channels) * (2 if use_cls_token else 1)
        self.n_output_channels = n_output_channels
        self.dropout = nn.Dropout2d(dropout)
        self.batchnorm_layer = nn.BatchNorm2d(self.channels) if use_batchnorm else nn.Identity()
        self.conv = nn.Conv2d(self.channels, n_output_channels, kernel_size=1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def _features(self, inputs) -> torch.Tensor:
        """Concatenated feature map [B, channels, h, w] from a list of maps or (map, class token) pairs."""
        inputs = list(inputs)
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"LinearHead: expected {len(self.in_channels)} feature maps, got {len(inputs)}")
        maps = []
        for i, item in enumerate(inputs):
            if self.use_cls_token:
                if not isinstance(item, (tuple, list)) or len(item) != 2:
                    raise ValueError(
                        f"LinearHead(use_cls_token=True): input {i} must be a (patch map, class token) pair; "
                        "build the backbone side with return_class_token=True"
                    )
                x, cls_token = item
            else:
                if isinstance(item, (tuple, list)):
                    raise ValueError(
                        f"LinearHead(use_cls_token=False): input {i} is a tuple, expected a tensor"
                    )
                x, cls_token = item, None
            if x.ndim == 2:  # a global feature vector acts as a 1x1 map
                x = x[:, :, None, None]
            if cls_token is not None:
                x = torch.cat((x, cls_token[:, :, None, None].expand_as(x)), dim=1)
            maps.append(x)
        size = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear") for m in maps]
        out = torch.cat(maps, dim=1)
        if out.shape[1] != self.channels:
            raise ValueError(f"LinearHead: features have {out.shape[1]} channels, expected {self.channels}")
        return out

    def forward(self, inputs) -> torch.Tensor:
        """Training output: logits at the feature-grid resolution."""
        x = self.dropout(self._features(inputs))
        return self.conv(self.batchnorm_layer(x))

    def predict(self, inputs, rescale_to=(512, 512)) -> torch.Tensor:
        """Inference output: logits [B, n_output_channels, *rescale_to] (no dropout)."""
        x = self.conv(self.batchnorm_layer(self._features(inputs)))
        return F.interpolate(x, size=tuple(rescale_to), mode="bilinear")
