import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, kept as a (B, H, W, C) grid so the caller knows the patch layout."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, device=None):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        # A strided conv would silently drop the right/bottom remainder: refuse instead.
        if h % p or w % p:
            raise ValueError(
                f"input size {h}x{w} is not a multiple of the patch size {p}; resize or pad the image "
                f"(e.g. to {-(-h // p) * p}x{-(-w // p) * p})"
            )
        return self.proj(x).permute(0, 2, 3, 1)
