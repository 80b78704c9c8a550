"""DINOv3 ConvNeXt (the distilled Tiny/Small/Base/Large backbones) with the official constructor keywords,
state-dict key names and DINO-style outputs (`forward_features`, `get_intermediate_layers`)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.drop_path import DropPath
from .precision import in_weights_precision

N_STAGES = 4


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (keys `weight`, `bias`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    """Depthwise 7x7 conv -> LayerNorm -> 4x MLP (GELU) -> per-channel scale `gamma` -> stochastic depth, added to
    the input.

    `gamma` is a bare parameter (key `gamma`), absent when `layer_scale_init_value <= 0`. `drop_path` drops the
    branch of whole samples in training mode only. `gradient_checkpointing` (set by `dinoseg.models.finetune` on
    the blocks that train) recomputes the block's activations in the backward pass instead of storing them.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6, *, device=None):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, device=device)
        self.norm = nn.LayerNorm(dim, eps=1e-6, device=device)
        self.pwconv1 = nn.Linear(dim, 4 * dim, device=device)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim, device=device)
        self.layer_scale_init_value = layer_scale_init_value
        self.gamma = (
            nn.Parameter(torch.full((dim,), layer_scale_init_value, device=device))
            if layer_scale_init_value > 0
            else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # Non-reentrant checkpointing restores the RNG state for the recomputation: same drop-path draws.
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # channels last for the norm and the linear layers
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


def _linear_rates(last: float, n: int) -> list[float]:
    """`n` drop-path rates from 0 to `last`, evenly spaced (the official `np.linspace(0, drop_path_rate, n)`)."""
    return [last * i / (n - 1) for i in range(n)] if n > 1 else [0.0] * n


def _stem(in_chans: int, dim: int, device=None) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chans, dim, kernel_size=4, stride=4, device=device),
                         LayerNorm2d(dim, eps=1e-6, device=device))


def _downsample(in_dim: int, out_dim: int, device=None) -> nn.Sequential:
    return nn.Sequential(LayerNorm2d(in_dim, eps=1e-6, device=device),
                         nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2, device=device))


class ConvNeXt(nn.Module):
    """ConvNeXt with four stages at strides 4, 8, 16 and 32, seen by the DINOv3 evaluation code as a backbone
    of four "blocks" (one per stage): `n_blocks == 4`, `embed_dim` = last stage width, `embed_dims` = all four.

    Args:
        in_chans: input channels.
        depths: blocks per stage (4 stages).
        dims: width of each stage.
        drop_path_rate: stochastic depth of the last block; the official schedule rises linearly from 0 over the
            blocks. It acts only on blocks in training mode, so a frozen backbone (always in eval mode) is unaffected.
        layer_scale_init_value: initial `gamma`; <= 0 removes the layer scale.
        patch_size: optional "pseudo patch size": `get_intermediate_layers` resizes its maps to
            (H // patch_size, W // patch_size), the grid of a ViT with that patch size. None keeps the stage grids.
        device: where to allocate the parameters (`"meta"` allocates nothing).

    The final LayerNorm is both `norm` and `norms[3]` (stages 0-2 have no norm), so `state_dict()` holds it twice
    under `norm.*` and `norms.3.*`, exactly like the official checkpoints, and `parameters()` counts it once.
    """

    def __init__(
        self,
        in_chans: int = 3,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        patch_size: int | None = None,
        *,
        device=None,
    ):
        super().__init__()
        if len(depths) != N_STAGES or len(dims) != N_STAGES:
            raise ValueError(f"ConvNeXt: depths and dims need {N_STAGES} stages each, got {list(depths)}, {list(dims)}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"ConvNeXt: drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if patch_size is not None and patch_size <= 0:
            raise ValueError(f"ConvNeXt: patch_size must be a positive int or None, got {patch_size}")
        dims = list(dims)
        self.downsample_layers = nn.ModuleList(
            [_stem(in_chans, dims[0], device)] + [_downsample(dims[i], dims[i + 1], device) for i in range(3)]
        )
        rates = iter(_linear_rates(drop_path_rate, sum(depths)))
        self.stages = nn.ModuleList(
            nn.Sequential(*(Block(dim, next(rates), layer_scale_init_value, device=device) for _ in range(depth)))
            for depth, dim in zip(depths, dims)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6, device=device)
        self.norms = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Identity(), self.norm])
        self.head = nn.Identity()
        self.embed_dim = dims[-1]
        self.embed_dims = dims
        self.n_blocks = N_STAGES
        self.n_storage_tokens = 0
        self.patch_size = patch_size
        self.input_pad_size = 4  # the stem's stride: the unit official dense heads pad inputs to
        self.register_load_state_dict_pre_hook(_check_duplicated_norm)
        self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation (truncated normal convs and linears, unit norms, `gamma` at its init value);
        no-op on the meta device."""
        if self.norm.weight.device.type == "meta":
            return
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, Block) and m.gamma is not None:
                nn.init.constant_(m.gamma, m.layer_scale_init_value)

    def _stage_maps(self, x: torch.Tensor, n_stages: int = N_STAGES) -> list[torch.Tensor]:
        """Raw (B, C_i, H_i, W_i) outputs of the first `n_stages` stages; each stride floors the size."""
        maps = []
        for downsample, stage in zip(self.downsample_layers[:n_stages], self.stages[:n_stages]):
            x = stage(downsample(x))
            maps.append(x)
        return maps

    @in_weights_precision
    def forward_features(self, x: torch.Tensor | list[torch.Tensor], masks=None):
        """The DINO output dict; the class token is the global average pool of the last stage, normalised with
        the patch tokens. `masks` is returned as given (a ConvNeXt has no mask token). A list of images gives a
        list of dicts (`masks`: None or one entry per image)."""
        if isinstance(x, (list, tuple)):
            masks = [None] * len(x) if masks is None else masks
            if len(masks) != len(x):
                raise ValueError(f"ConvNeXt.forward_features: {len(x)} images but {len(masks)} masks")
            return [self.forward_features(image, m) for image, m in zip(x, masks)]
        fmap = self._stage_maps(x)[-1]
        tokens = fmap.flatten(2).transpose(1, 2)
        normed = self.norm(torch.cat([fmap.mean((-2, -1)).unsqueeze(1), tokens], dim=1))
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_storage_tokens": normed[:, 1 : self.n_storage_tokens + 1],
            "x_norm_patchtokens": normed[:, self.n_storage_tokens + 1 :],
            "x_prenorm": tokens,
            "masks": masks,
        }

    def forward(self, x, masks=None, is_training: bool = False):
        out = self.forward_features(x, masks)
        return out if is_training else self.head(out["x_norm_clstoken"])

    @in_weights_precision
    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ):
        """Outputs of some stages: the last `n` if `n` is an int, else the listed stage indices (in that order).

        Patch maps come as (B, h*w, C), or (B, C, h, w) with `reshape`; the class token of a stage is its average
        pool. `norm` applies `norms[i]` (only the last stage has one). With `patch_size`, maps are resized
        (bilinear, antialiased) to the pseudo patch grid after pooling the class token.
        """
        wanted = list(range(N_STAGES - n, N_STAGES)) if isinstance(n, int) else list(n)
        bad = [i for i in wanted if not 0 <= i < N_STAGES]
        if bad or not wanted:
            raise ValueError(f"get_intermediate_layers: stage indices {bad or n} out of range for {N_STAGES} stages")
        maps = self._stage_maps(x, max(wanted) + 1)  # later stages cannot change the outputs
        patches, class_tokens = [], []
        for i in wanted:
            fmap = maps[i]
            cls_token = fmap.mean((-2, -1))
            if self.patch_size is not None:
                grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
                fmap = F.interpolate(fmap, size=grid, mode="bilinear", antialias=True)
            if norm:
                cls_token = self.norms[i](cls_token)
                tokens = self.norms[i](fmap.flatten(2).transpose(1, 2))
                fmap = tokens.transpose(1, 2).reshape(fmap.shape)
            patches.append(fmap.contiguous() if reshape else fmap.flatten(2).transpose(1, 2))
            class_tokens.append(cls_token)
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        return tuple(patches)


def _check_duplicated_norm(module, state_dict, prefix, *args):
    # `norm` and `norms.3` are one module stored twice; two different copies would be resolved silently by
    # load order, so refuse them.
    for name in ("weight", "bias"):
        a, b = state_dict.get(f"{prefix}norm.{name}"), state_dict.get(f"{prefix}norms.3.{name}")
        if a is None or b is None or "meta" in (a.device.type, b.device.type):
            continue
        if a.shape != b.shape or not torch.equal(a, b):
            raise ValueError(
                f"{prefix}norm.{name} and {prefix}norms.3.{name} differ: they are the same final LayerNorm, "
                f"stored twice in official ConvNeXt checkpoints, and must be equal"
            )
