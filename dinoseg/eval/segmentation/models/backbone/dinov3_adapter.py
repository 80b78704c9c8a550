"""ViT-Adapter on a frozen DINOv3 backbone (the official DINOv3 Mask2Former feature extractor).

A convolutional spatial prior module (SPM) produces features at strides 4/8/16/32. At each chosen backbone
layer an *extractor* (deformable cross-attention + ConvFFN) lets the stride-8/16/32 SPM tokens read the ViT
patch tokens; the ViT itself is never modified ("extractor-only" interaction). The outputs ``{"1".."4"}`` are
the SPM features plus the resized ViT features, batch-normalised.

Differences from the official code, none of which changes the outputs on inputs it supports:
- inputs whose sides are not multiples of 32 (and of the patch size) are zero-padded at the bottom/right and
  the outputs cropped back to ``ceil(side / stride)``; the official code fails on them;
- the backbone runs under the caller's autocast instead of a hard-coded CUDA bfloat16 one (``backbone_dtype``
  restores that), and stays in eval mode when the adapter is put in training mode;
- BatchNorm is plain ``nn.BatchNorm2d`` (same state-dict keys as ``SyncBatchNorm``; convert with
  ``nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU training).
"""

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import checkpoint

from dinoseg.models.frozen import backbone_grad_mode, freeze_backbone, set_backbone_mode
from dinoseg.models.precision import backbone_autocast

from ..utils.ms_deform_attn import MSDeformAttn

# The SPM strides of the token levels the extractors query (c2, c3, c4).
QUERY_STRIDES = (8, 16, 32)
TOKEN_NORM = partial(nn.LayerNorm, eps=1e-6)  # norm of the extractors' queries, features and FFN input


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch and rescale the others."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


def get_reference_points(spatial_shapes: Sequence[tuple[int, int]], device=None) -> torch.Tensor:
    """Pixel centres of each level, normalised to [0, 1] as (x, y): ``[1, sum(H * W), 1, 2]``."""
    points = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((x.reshape(-1), y.reshape(-1)), -1))
    return torch.cat(points, 0)[None, :, None]


class DWConv(nn.Module):
    """3x3 depth-wise convolution applied separately to each token level of a concatenated sequence."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        B, _, C = x.shape
        chunks = x.split([h * w for h, w in spatial_shapes], dim=1)
        out = [
            self.dwconv(t.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)
            for t, (h, w) in zip(chunks, spatial_shapes)
        ]
        return torch.cat(out, dim=1)


class ConvFFN(nn.Module):
    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
    ):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        x = self.act(self.dwconv(self.fc1(x), spatial_shapes))
        return self.drop(self.fc2(self.drop(x)))


class Extractor(nn.Module):
    """Queries (SPM tokens) read the ViT tokens through deformable cross-attention, then a ConvFFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        n_points: int = 4,
        n_levels: int = 1,
        deform_ratio: float = 1.0,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = TOKEN_NORM,
        with_cp: bool = False,
    ):
        super().__init__()
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim)
        self.attn = MSDeformAttn(d_model=dim, n_levels=n_levels, n_heads=num_heads, n_points=n_points, ratio=deform_ratio)
        self.with_cffn = with_cffn
        self.with_cp = with_cp
        if with_cffn:
            self.ffn = ConvFFN(in_features=dim, hidden_features=int(dim * cffn_ratio), drop=drop)
            self.ffn_norm = norm_layer(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        feat: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        query_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        def inner(query, feat):
            query = query + self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), spatial_shapes)
            if self.with_cffn:
                query = query + self.drop_path(self.ffn(self.ffn_norm(query), query_shapes))
            return query

        if self.with_cp and self.training and query.requires_grad:
            return checkpoint.checkpoint(inner, query, feat, use_reentrant=False)
        return inner(query, feat)


class InteractionBlock(nn.Module):
    """One extractor (plus, on the last block, two extra extractors) over one backbone layer."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        n_points: int = 4,
        norm_layer: Callable[[int], nn.Module] = TOKEN_NORM,
        drop: float = 0.0,
        drop_path: float = 0.0,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        deform_ratio: float = 1.0,
        extra_extractor: bool = False,
        with_cp: bool = False,
    ):
        super().__init__()
        make = partial(
            Extractor,
            dim=dim,
            n_levels=1,
            num_heads=num_heads,
            n_points=n_points,
            norm_layer=norm_layer,
            deform_ratio=deform_ratio,
            with_cffn=with_cffn,
            cffn_ratio=cffn_ratio,
            drop=drop,
            drop_path=drop_path,
            with_cp=with_cp,
        )
        self.extractor = make()
        self.extra_extractors = nn.Sequential(make(), make()) if extra_extractor else None

    def forward(self, x, c, reference_points, x_shape, c_shapes):
        extractors = [self.extractor] + (list(self.extra_extractors) if self.extra_extractors is not None else [])
        for extractor in extractors:
            c = extractor(c, reference_points, x, [x_shape], c_shapes)
        return c


class SpatialPriorModule(nn.Module):
    """Convolutional stem giving features at strides 4, 8, 16 and 32, projected to the ViT width."""

    def __init__(
        self,
        inplanes: int = 64,
        embed_dim: int = 384,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()

        def conv_bn_relu(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm_layer(cout), nn.ReLU(inplace=True)]

        self.stem = nn.Sequential(
            *conv_bn_relu(3, inplanes, 2),
            *conv_bn_relu(inplanes, inplanes, 1),
            *conv_bn_relu(inplanes, inplanes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)


class DINOv3_Adapter(nn.Module):
    """ViT-Adapter feature pyramid on a frozen DINOv3 backbone.

    Args:
        backbone: a DINOv3 ViT (``get_intermediate_layers``, ``embed_dim``, ``patch_size``); frozen here.
        interaction_indexes: backbone blocks read by the interaction blocks (the last one gets the extra
            extractors).
        pretrain_size, init_values: official arguments without an effect (kept as attributes).
        conv_inplane: SPM width.
        n_points, deform_num_heads, deform_ratio: deformable attention of the extractors.
        drop_path_rate: stochastic depth on the extractors' ConvFFN branch (training only).
        with_cffn, cffn_ratio: ConvFFN after each extractor and its hidden width ratio.
        add_vit_feature: add the resized ViT features to the SPM outputs.
        use_extra_extractor: two extra extractors on the last interaction block.
        with_cp: gradient checkpointing of the extractors while training.
        norm_layer: 2D norm of the SPM and of the four outputs.
        backbone_dtype: autocast dtype of the backbone alone, whatever the caller's (the official adapter hard-codes
            bfloat16 on CUDA; float32: no autocast); None: the caller's autocast.

    ``forward(x)`` returns ``{"1": stride 4, "2": stride 8, "3": stride 16, "4": stride 32}``, each
    ``[B, embed_dim, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        interaction_indexes: Sequence[int] = (9, 19, 29, 39),
        pretrain_size: int = 512,
        conv_inplane: int = 64,
        n_points: int = 4,
        deform_num_heads: int = 16,
        drop_path_rate: float = 0.3,
        init_values: float = 0.0,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        deform_ratio: float = 0.5,
        add_vit_feature: bool = True,
        use_extra_extractor: bool = True,
        with_cp: bool = True,
        *,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        backbone_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.backbone = freeze_backbone(backbone)
        # Official arguments that change nothing there either (no position embedding, no layer scale).
        self.pretrain_size, self.init_values = (pretrain_size, pretrain_size), init_values
        self.backbone_dtype = backbone_dtype
        n_blocks = getattr(backbone, "n_blocks", None)
        bad = [i for i in interaction_indexes if n_blocks is not None and not 0 <= i < n_blocks]
        if bad or len(interaction_indexes) == 0:
            raise ValueError(
                f"DINOv3_Adapter: interaction_indexes {list(interaction_indexes)} invalid for a backbone with "
                f"{n_blocks} blocks"
            )
        if add_vit_feature and len(interaction_indexes) != 4:
            raise ValueError(
                f"DINOv3_Adapter: add_vit_feature needs 4 interaction_indexes (one per output), got "
                f"{list(interaction_indexes)}"
            )
        self.interaction_indexes = list(interaction_indexes)
        self.add_vit_feature = add_vit_feature
        embed_dim = backbone.embed_dim
        self.embed_dim = embed_dim
        self.patch_size = backbone.patch_size
        # Pad so that both the SPM (stride 32) and the patch grid divide the input.
        self.size_divisor = math.lcm(QUERY_STRIDES[-1], self.patch_size)

        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPriorModule(inplanes=conv_inplane, embed_dim=embed_dim, norm_layer=norm_layer)
        last = len(self.interaction_indexes) - 1
        self.interactions = nn.Sequential(
            *[
                InteractionBlock(
                    dim=embed_dim,
                    num_heads=deform_num_heads,
                    n_points=n_points,
                    drop_path=drop_path_rate,
                    with_cffn=with_cffn,
                    cffn_ratio=cffn_ratio,
                    deform_ratio=deform_ratio,
                    extra_extractor=use_extra_extractor and i == last,
                    with_cp=with_cp,
                )
                for i in range(len(self.interaction_indexes))
            ]
        )
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norm1 = norm_layer(embed_dim)
        self.norm2 = norm_layer(embed_dim)
        self.norm3 = norm_layer(embed_dim)
        self.norm4 = norm_layer(embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation of the adapter (not the backbone); no-op on the meta device."""
        if self.level_embed.device.type == "meta":
            return
        for module in (self.up, self.spm, self.interactions):
            module.apply(self._init_module)
        for m in self.interactions.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen: RoPE coordinate augmentation and dropout are pre-training only (but for the blocks that train).
        set_backbone_mode(self.backbone, mode)
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        B, _, H, W = x.shape
        d = self.size_divisor
        # Pad and crop unconditionally (a no-op for aligned sizes): without a branch on the size, an exported
        # graph (torch.export with symbolic sizes) pads whatever its input size is. Sizes are rounded up with
        # non-negative integer division only (ONNX divides integers towards zero, not towards minus infinity),
        # written as multiples of d so that the symbolic level sizes below simplify.
        h, w = (H + d - 1) // d * d, (W + d - 1) // d * d
        x = F.pad(x, (0, w - W, 0, h - H))
        c_shapes = [(h // s, w // s) for s in QUERY_STRIDES]
        x_shape = (h // self.patch_size, w // self.patch_size)
        reference_points = get_reference_points(c_shapes, device=x.device)

        c1, c2, c3, c4 = self.spm(x)
        c = torch.cat(
            [level.flatten(2).transpose(1, 2) + self.level_embed[i] for i, level in enumerate((c2, c3, c4))], dim=1
        )

        # A frozen backbone builds no autograd graph; backbone_dtype float32 turns autocast off around it.
        with backbone_grad_mode(self.backbone), backbone_autocast(x.device.type, self.backbone_dtype):
            layers = self.backbone.get_intermediate_layers(x, n=self.interaction_indexes, norm=True)

        vit_maps = []
        for feat, block in zip(layers, self.interactions):
            c = block(feat, c, reference_points, x_shape, c_shapes)
            vit_maps.append(feat.transpose(1, 2).reshape(B, self.embed_dim, *x_shape))

        c2, c3, c4 = (
            t.transpose(1, 2).reshape(B, self.embed_dim, hh, ww)
            for t, (hh, ww) in zip(c.split([hh * ww for hh, ww in c_shapes], dim=1), c_shapes)
        )
        levels = [self.up(c2) + c1, c2, c3, c4]
        del c, c1, c2, c3, c4
        norms = (self.norm1, self.norm2, self.norm3, self.norm4)
        result = {}
        # One level at a time, dropping each input once used: at the stride-4 level a map of embed_dim channels
        # is large (the 7B's is 1 GB at 896 x 896), and holding every level's sums at once adds several of them.
        for i, (norm, stride) in enumerate(zip(norms, (4,) + QUERY_STRIDES)):
            o, levels[i] = levels[i], None
            if self.add_vit_feature:
                o = o + F.interpolate(vit_maps[i], size=o.shape[-2:], mode="bilinear", align_corners=False)
                vit_maps[i] = None
            # Crop before the norm so training statistics ignore the padding.
            result[str(i + 1)] = norm(o[..., : (H + stride - 1) // stride, : (W + stride - 1) // stride])
            del o
        return result
