"""Depthers: a frozen DINOv3 encoder, a linear or DPT head, and the conversion of head outputs to depth.

State-dict keys follow the official `Depther`: ``encoder.backbone.*`` and ``decoder.*``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dinoseg.eval.utils import BackboneLayersSet
from dinoseg.models.precision import weights_autocast

from .bins import create_chmv2_mixlog_bins, create_outputs_with_chmv2_mixlog_norm
from .encoder import DinoVisionTransformerWrapper, PatchSizeAdaptationStrategy
from .heads.dpt_head import DPTHead
from .heads.linear_head import LinearHead

logger = logging.getLogger("dinoseg")

__all__ = [
    "BackboneLayersSet",
    "DPTHead",
    "DecoderConfig",
    "Depther",
    "DinoVisionTransformerWrapper",
    "FeaturesToDepth",
    "LinearHead",
    "PatchSizeAdaptationStrategy",
    "build_depther",
    "make_depther_from_config",
    "make_head",
]

BINS_STRATEGIES = ("linear", "log", "chmv2_mixlog")
NORM_STRATEGIES = ("linear", "softmax", "sigmoid", "chmv2_mixlog")
HEAD_TYPES = ("linear", "dpt")


@dataclass
class DecoderConfig:
    min_depth: float = 0.001
    max_depth: float = 80
    bins_strategy: str = "linear"  # linear | log | chmv2_mixlog: placement of the depth bins
    norm_strategy: str = "linear"  # linear | softmax | sigmoid | chmv2_mixlog: bin logits -> bin weights
    head_kwargs: dict[str, Any] = field(default_factory=dict)  # DPTHead options (channels, post_process_channels...)
    backbone_out_layers: Any = BackboneLayersSet.FOUR_EVEN_INTERVALS  # a BackboneLayersSet or block indices
    adapt_to_patch_size: PatchSizeAdaptationStrategy = PatchSizeAdaptationStrategy.CENTER_PADDING
    use_backbone_norm: bool = True
    type: str = "linear"  # linear | dpt
    n_output_channels: int = 256  # depth bins; 1 = direct regression
    use_batchnorm: bool = False
    use_cls_token: bool = False


class FeaturesToDepth(nn.Module):
    """Head outputs [N, C, H, W] -> depth [N, 1, H, W].

    One channel is a direct regression: ``relu(x) + min_depth``. Several channels are bin weights (AdaBins):
    depth is the weighted mean of C bin centres on [min_depth, max_depth], spaced by `bins_strategy`
    (``linear``, ``log``, or ``chmv2_mixlog``: from log to linear spacing on [min_depth, max_depth / 8]), the
    weights coming from the logits by `norm_strategy` (``linear``: ``relu(x) + 0.1`` normalised, ``softmax``,
    ``sigmoid`` normalised, or ``chmv2_mixlog``: ReLU normalised, times 8).
    """

    def __init__(self, min_depth: float = 0.001, max_depth: float = 80, bins_strategy: str = "linear",
                 norm_strategy: str = "linear"):
        super().__init__()
        if bins_strategy not in BINS_STRATEGIES:
            raise ValueError(f"unknown bins_strategy {bins_strategy!r}; expected one of {list(BINS_STRATEGIES)}")
        if norm_strategy not in NORM_STRATEGIES:
            raise ValueError(f"unknown norm_strategy {norm_strategy!r}; expected one of {list(NORM_STRATEGIES)}")
        if not 0 < min_depth < max_depth:
            raise ValueError(f"depth range must satisfy 0 < min_depth < max_depth, got ({min_depth}, {max_depth})")
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.bins_strategy = bins_strategy
        self.norm_strategy = norm_strategy

    def bins(self, n_bins: int, device=None) -> torch.Tensor:
        if self.bins_strategy == "linear":
            return torch.linspace(self.min_depth, self.max_depth, n_bins, device=device)
        if self.bins_strategy == "log":
            low, high = torch.log(torch.tensor(self.min_depth)), torch.log(torch.tensor(self.max_depth))
            return torch.exp(torch.linspace(low, high, n_bins, device=device))
        return create_chmv2_mixlog_bins(self.min_depth, self.max_depth, n_bins, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_bins = x.shape[1]
        if n_bins == 1:
            return torch.relu(x) + self.min_depth
        bins = self.bins(n_bins, device=x.device)
        if self.norm_strategy == "chmv2_mixlog":
            return create_outputs_with_chmv2_mixlog_norm(x, bins)
        if self.norm_strategy == "linear":
            weights = torch.relu(x) + 0.1
            weights = weights / weights.sum(dim=1, keepdim=True)
        elif self.norm_strategy == "softmax":
            weights = torch.softmax(x, dim=1)
        else:
            weights = torch.sigmoid(x)
            weights = weights / weights.sum(dim=1, keepdim=True)
        return torch.einsum("ikmn,k->imn", weights, bins).unsqueeze(1)

    def extra_repr(self) -> str:
        return (f"min_depth={self.min_depth}, max_depth={self.max_depth}, bins_strategy={self.bins_strategy!r}, "
                f"norm_strategy={self.norm_strategy!r}")


def make_head(
    embed_dims: int | list[int],
    n_output_channels: int,
    use_batchnorm: bool = False,
    use_cls_token: bool = False,
    head_type: str = "linear",
    **kwargs,
) -> nn.Module:
    """A linear or DPT head on layers of widths `embed_dims`; `kwargs` are `LinearHead` / `DPTHead` options."""
    embed_dims = [embed_dims] if isinstance(embed_dims, int) else list(embed_dims)
    if head_type not in HEAD_TYPES:
        raise ValueError(f"unknown head type {head_type!r}; expected one of {list(HEAD_TYPES)}")
    head_cls = LinearHead if head_type == "linear" else DPTHead
    options = dict(in_channels=embed_dims, n_output_channels=n_output_channels, use_batchnorm=use_batchnorm)
    if head_type == "linear":
        options["use_cls_token"] = use_cls_token
    else:
        options["readout_type"] = "project" if use_cls_token else "ignore"
    try:
        return head_cls(**options, **kwargs)
    except TypeError as e:
        raise ValueError(f"invalid head_kwargs {sorted(kwargs)} for a {head_type!r} head: {e}") from None


class Depther(nn.Module):
    """encoder (frozen backbone side) -> decoder (head) -> `FeaturesToDepth`: images [B, 3, H, W] -> depth
    [B, 1, h, w] in metres (the head's resolution: patch grid for linear heads, 16 pixels per patch for DPT).

    `autocast_dtype` is the mixed precision of the encoder and decoder on the input's device; float32 means no
    autocast on any device, unless the weights are stored in half precision (`dinoseg.models.precision`), which
    implies autocast in their dtype. The conversion to depth always runs in float32. Nothing is moved between
    devices: ``depther.to(device)`` as for any module.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, min_depth: float, max_depth: float,
                 bins_strategy: str = "linear", norm_strategy: str = "linear",
                 autocast_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.features_to_depth = FeaturesToDepth(min_depth, max_depth, bins_strategy, norm_strategy)
        self.autocast_dtype = autocast_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with weights_autocast(self, x.device.type, self.autocast_dtype):
            logits = self.decoder(self.encoder(x))
        return self.features_to_depth(logits.float())


def build_depther(
    backbone: nn.Module,
    backbone_out_layers: tuple[int, ...] | list[int] | BackboneLayersSet | str,
    n_output_channels: int,
    use_backbone_norm: bool = False,
    use_batchnorm: bool = False,
    use_cls_token: bool = False,
    adapt_to_patch_size: PatchSizeAdaptationStrategy | str = PatchSizeAdaptationStrategy.CENTER_PADDING,
    head_type: str = "dpt",
    autocast_dtype: torch.dtype = torch.float32,
    min_depth: float = 0.001,
    max_depth: float = 10.0,
    bins_strategy: str = "linear",
    norm_strategy: str = "linear",
    **kwargs,
) -> Depther:
    """A depther (in eval mode) on `backbone`; `kwargs` go to the head (e.g. DPT ``channels``)."""
    encoder = DinoVisionTransformerWrapper(
        backbone_model=backbone,
        backbone_out_layers=backbone_out_layers,
        use_backbone_norm=use_backbone_norm,
        adapt_to_patch_size=adapt_to_patch_size,
    )
    decoder = make_head(
        encoder.embed_dims,
        n_output_channels=n_output_channels,
        use_batchnorm=use_batchnorm,
        use_cls_token=use_cls_token,
        head_type=head_type,
        **kwargs,
    )
    depther = Depther(encoder, decoder, min_depth=min_depth, max_depth=max_depth, bins_strategy=bins_strategy,
                      norm_strategy=norm_strategy, autocast_dtype=autocast_dtype)
    return depther.eval()


def load_decoder_checkpoint(depther: Depther, checkpoint_path: str) -> Depther:
    """Strictly load a head checkpoint into ``depther.decoder``: the released ``*_dpt_head-*.pth`` files (keys
    without prefix), the official trainer's ``{"model": ...}`` (``module.`` from DDP dropped), or a
    ``decoder.*`` state dict."""
    from dinoseg.models.checkpoint import load_state_dict_file

    return load_decoder_state_dict(depther, load_state_dict_file(checkpoint_path), source=str(checkpoint_path))


def load_decoder_state_dict(depther: Depther, state_dict: dict, source: str) -> Depther:
    """`load_decoder_checkpoint` on a state dict already read (`source` names it in errors). When the depther's
    backbone is adapted (rebuilt from a dinoseg run's checkpoint), the state dict holds the head and the adapted
    tensors under their full names, and is loaded so."""
    from dinoseg.models.checkpoint import load_head_state_dict, load_state_dict_strict
    from dinoseg.models.frozen import adaptation_of

    assign = any(t.is_meta for t in depther.decoder.state_dict().values())
    if any(adaptation_of(m) is not None for m in depther.modules()):
        load_head_state_dict(depther, state_dict, source=source, assign=assign)
        return depther
    for prefix in ("module.", "decoder."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    load_state_dict_strict(depther.decoder, state_dict, source=source, assign=assign)
    return depther


def make_depther_from_config(
    backbone: nn.Module,
    config: DecoderConfig,
    checkpoint_path: str | None = None,
    autocast_dtype: torch.dtype = torch.float32,
) -> Depther:
    """`build_depther` with the fields of `config`; `checkpoint_path` (a head checkpoint) is loaded strictly
    into the decoder, the backbone keeping its own weights."""
    depther = build_depther(
        backbone,
        backbone_out_layers=config.backbone_out_layers,
        n_output_channels=config.n_output_channels,
        use_backbone_norm=config.use_backbone_norm,
        use_batchnorm=config.use_batchnorm,
        use_cls_token=config.use_cls_token,
        adapt_to_patch_size=config.adapt_to_patch_size,
        head_type=config.type,
        autocast_dtype=autocast_dtype,
        min_depth=config.min_depth,
        max_depth=config.max_depth,
        bins_strategy=config.bins_strategy,
        norm_strategy=config.norm_strategy,
        **dict(config.head_kwargs),
    )
    if checkpoint_path is not None:
        load_decoder_checkpoint(depther, checkpoint_path)
    return depther
