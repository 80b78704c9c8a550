"""Small layers of the detector (official names)."""

from torch import nn


class LayerNorm2D(nn.Module):
    """A LayerNorm over the channels of a (N, C, H, W) map (key ``ln``; None as `norm_layer` gives an identity)."""

    def __init__(self, normalized_shape, norm_layer=nn.LayerNorm):
        super().__init__()
        self.ln = norm_layer(normalized_shape) if norm_layer is not None else nn.Identity()

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
