"""DINOv3 vision transformer with the official constructor keywords and state-dict key names."""

from functools import partial

import torch
from torch import nn

from ..layers import LayerScale, PatchEmbed, RopePositionEmbedding, SelfAttentionBlock
from ..layers.rope_position_encoding import DTYPES
from .precision import in_weights_precision

NORM_LAYERS = {
    "layernorm": partial(nn.LayerNorm, eps=1e-6),
    "layernormbf16": partial(nn.LayerNorm, eps=1e-5),
    "rmsnorm": partial(nn.RMSNorm, eps=1e-5),
}


class DinoVisionTransformer(nn.Module):
    """`drop_path_rate`: the official stochastic depth, the same rate in every block (see `SelfAttentionBlock`); it
    acts only on blocks in training mode, so a frozen backbone (always in eval mode) is unaffected."""

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        pos_embed_rope_base: float | None = 100.0,
        pos_embed_rope_min_period: float | None = None,
        pos_embed_rope_max_period: float | None = None,
        pos_embed_rope_normalize_coords: str = "separate",
        pos_embed_rope_shift_coords: float | None = None,
        pos_embed_rope_jitter_coords: float | None = None,
        pos_embed_rope_rescale_coords: float | None = None,
        pos_embed_rope_dtype: str = "bf16",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = None,
        norm_layer: str = "layernorm",
        ffn_layer: str = "mlp",
        ffn_bias: bool = True,
        proj_bias: bool = True,
        n_storage_tokens: int = 0,
        mask_k_bias: bool = False,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        device=None,
    ):
        super().__init__()
        if norm_layer not in NORM_LAYERS:
            raise ValueError(f"unknown norm_layer {norm_layer!r}; expected one of {sorted(NORM_LAYERS)}")
        if pos_embed_rope_dtype not in DTYPES:
            raise ValueError(f"unknown pos_embed_rope_dtype {pos_embed_rope_dtype!r}; expected one of {sorted(DTYPES)}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        norm = NORM_LAYERS[norm_layer]
        self.img_size = img_size  # informational: any multiple of patch_size is accepted
        self.num_features = self.embed_dim = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.n_storage_tokens = n_storage_tokens

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, device=device)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, device=device))
        if n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.empty(1, n_storage_tokens, embed_dim, device=device))
        self.rope_embed = RopePositionEmbedding(
            embed_dim,
            num_heads=num_heads,
            base=pos_embed_rope_base,
            min_period=pos_embed_rope_min_period,
            max_period=pos_embed_rope_max_period,
            normalize_coords=pos_embed_rope_normalize_coords,
            shift_coords=pos_embed_rope_shift_coords,
            jitter_coords=pos_embed_rope_jitter_coords,
            rescale_coords=pos_embed_rope_rescale_coords,
            dtype=DTYPES[pos_embed_rope_dtype],
            device=device,
        )
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                embed_dim,
                num_heads,
                ffn_ratio=ffn_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                ffn_layer=ffn_layer,
                norm_layer=norm,
                init_values=layerscale_init,
                drop_path=drop_path_rate,  # the official rate is the same for every block
                mask_k_bias=mask_k_bias,
                device=device,
            )
            for _ in range(depth)
        )
        self.norm = norm(embed_dim, device=device)
        self.untie_cls_and_patch_norms = untie_cls_and_patch_norms
        self.cls_norm = norm(embed_dim, device=device) if untie_cls_and_patch_norms else None
        # The 7B / SAT models keep a second class-token norm for local crops (used in pre-training only).
        self.untie_global_and_local_cls_norm = untie_global_and_local_cls_norm
        self.local_cls_norm = norm(embed_dim, device=device) if untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim, device=device))
        self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation for training from scratch or tests; no-op on the meta device."""
        if self.cls_token.device.type == "meta":
            return
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.n_storage_tokens > 0:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm, LayerScale)):
                m.reset_parameters()
        k = 1 / (self.patch_embed.proj.in_channels * self.patch_size**2)
        nn.init.uniform_(self.patch_embed.proj.weight, -(k**0.5), k**0.5)
        nn.init.zeros_(self.patch_embed.proj.bias)

    # -- tokens -------------------------------------------------------------------------------------------------
    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None):
        x = self.patch_embed(x)
        B, H, W, _ = x.shape
        x = x.flatten(1, 2)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        cls_token = self.cls_token.expand(B, -1, -1)
        prefix = [cls_token]
        if self.n_storage_tokens > 0:
            prefix.append(self.storage_tokens.expand(B, -1, -1))
        return torch.cat(prefix + [x], dim=1), (H, W)

    def _run_blocks(self, x: torch.Tensor, hw: tuple[int, int], keep: set[int] | None = None):
        rope = self.rope_embed(H=hw[0], W=hw[1])
        kept = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, rope)
            if keep is not None and i in keep:
                kept.append(x)
        return x, kept

    def _split_norm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (class + storage tokens, patch tokens)."""
        n = self.n_storage_tokens + 1
        if self.untie_cls_and_patch_norms:
            return self.cls_norm(x[:, :n]), self.norm(x[:, n:])
        # The local-crop class norm is a pre-training detail: inference uses `norm` for every token.
        x = self.norm(x)
        return x[:, :n], x[:, n:]

    @in_weights_precision
    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        x, hw = self.prepare_tokens_with_masks(x, masks)
        x, _ = self._run_blocks(x, hw)
        cls_reg, patch = self._split_norm(x)
        return {
            "x_norm_clstoken": cls_reg[:, 0],
            "x_storage_tokens": cls_reg[:, 1:],
            "x_norm_patchtokens": patch,
            "x_prenorm": x,
            "masks": masks,
        }

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None, is_training: bool = False):
        out = self.forward_features(x, masks)
        return out if is_training else self.head(out["x_norm_clstoken"])

    @in_weights_precision
    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        *,
        n: int | list[int] | tuple[int, ...] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ):
        """Outputs of some blocks: the last `n` if `n` is an int, else the blocks whose indices are listed."""
        depth = len(self.blocks)
        wanted = list(range(depth - n, depth)) if isinstance(n, int) else list(n)
        bad = [i for i in wanted if not 0 <= i < depth]
        if bad or (isinstance(n, int) and not 0 < n <= depth):
            raise ValueError(f"get_intermediate_layers: block indices {bad or n} out of range for depth {depth}")
        tokens, hw = self.prepare_tokens_with_masks(x)
        # Stop after the last wanted block: later blocks cannot change the outputs.
        last = max(wanted)
        rope = self.rope_embed(H=hw[0], W=hw[1])
        outputs = {}
        for i, blk in enumerate(self.blocks[: last + 1]):
            tokens = blk(tokens, rope)
            if i in wanted:
                outputs[i] = tokens
        results = [outputs[i] for i in wanted]
        n_prefix = self.n_storage_tokens + 1
        if norm:
            results = [torch.cat(self._split_norm(r), dim=1) for r in results]
        class_tokens = [r[:, 0] for r in results]
        extra_tokens = [r[:, 1:n_prefix] for r in results]
        patches = [r[:, n_prefix:] for r in results]
        if reshape:
            B, _, h, w = x.shape
            p = self.patch_size
            patches = [t.reshape(B, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for t in patches]
        if return_class_token and return_extra_tokens:
            return tuple(zip(patches, class_tokens, extra_tokens))
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        if return_extra_tokens:
            return tuple(zip(patches, extra_tokens))
        return tuple(patches)
