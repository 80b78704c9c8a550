"""Released DINOv3 depth heads: file names, their architectures, and where dinoseg looks for them."""

from enum import Enum

from ....models.backbones import DINOV3_BASE_URL
from ....models.checkpoint import find_in_hub_cache
from . import DecoderConfig


class DepthWeights(Enum):
    CHMV2 = "CHMV2"
    SYNTHMIX = "SYNTHMIX"


# Released heads: (backbone, weights) -> (folder on the download server, file name).
HEAD_FILES = {
    ("dinov3_vit7b16", DepthWeights.SYNTHMIX): ("dinov3_vit7b16", "dinov3_vit7b16_synthmix_dpt_head-02040be1.pth"),
    ("dinov3_vitl16", DepthWeights.CHMV2): ("chmv2", "dinov3_vitl16_chmv2_dpt_head-3703d643.pth"),
}

# Released depthers usable by name (`head=dinov3_vit7b16_dd`, the official `load_from`): backbone, head weights.
RELEASED_DEPTHERS = {"dinov3_vit7b16_dd": ("dinov3_vit7b16", DepthWeights.SYNTHMIX)}

# The SYNTHMIX DPT head: layers a quarter of the depth apart, 512 fusion channels, 256 linear bins, 0.001-100 m.
_DPT_OUT_LAYERS = {"dinov3_vitl16": [4, 11, 17, 23], "dinov3_vit7b16": [9, 19, 29, 39]}
_DPT_POST_PROCESS_CHANNELS = {"dinov3_vitl16": [1024] * 4, "dinov3_vit7b16": [2048] * 4}
SYNTHMIX_DEPTH_RANGE = (0.001, 100.0)


def dpt_depther_config(backbone_name: str = "dinov3_vit7b16", depth_range: tuple[float, float] | None = None) -> DecoderConfig:
    """`DecoderConfig` of the released SYNTHMIX DPT head on `backbone_name`."""
    if backbone_name not in _DPT_OUT_LAYERS:
        raise ValueError(f"no DPT depther layout for {backbone_name!r}; expected one of {sorted(_DPT_OUT_LAYERS)}")
    min_depth, max_depth = depth_range or SYNTHMIX_DEPTH_RANGE
    return DecoderConfig(
        min_depth=min_depth,
        max_depth=max_depth,
        backbone_out_layers=list(_DPT_OUT_LAYERS[backbone_name]),
        n_output_channels=256,
        use_backbone_norm=True,
        use_batchnorm=True,
        use_cls_token=False,
        type="dpt",
        head_kwargs=dict(channels=512, post_process_channels=list(_DPT_POST_PROCESS_CHANNELS[backbone_name])),
    )


def chmv2_depther_config() -> DecoderConfig:
    """`DecoderConfig` of the released CHMv2 head (canopy height, 0.001-96 m, mixed-log bins, class-token readout)."""
    return DecoderConfig(
        min_depth=0.001,
        max_depth=96.0,
        backbone_out_layers=[5, 11, 17, 23],
        n_output_channels=256,
        use_backbone_norm=True,
        use_batchnorm=False,
        use_cls_token=True,
        type="dpt",
        bins_strategy="chmv2_mixlog",
        norm_strategy="chmv2_mixlog",
        head_kwargs=dict(n_hidden_channels=128, use_bias=True, projection_after_fusion=False),
    )


def head_location(backbone_name: str, weights, default: DepthWeights, *, key: str = "weights") -> str:
    """A `DepthWeights` member (or its name) -> the released file in the torch hub cache; else a path / URL. `key`:
    what takes a path instead, in messages (`weights` for the hub functions, `head` on the command line)."""
    if isinstance(weights, str) and weights.upper() in DepthWeights.__members__:
        weights = DepthWeights[weights.upper()]
    if isinstance(weights, DepthWeights):
        if weights != default:
            raise ValueError(f"{backbone_name} depther: there is no released {weights.value} head for it; "
                             f"use {default.value} or pass {key}=<path>")
        folder, filename = HEAD_FILES[(backbone_name, weights)]
        return str(find_in_hub_cache(filename, f"the official {weights.value} depth head of {backbone_name}",
                                     f"{DINOV3_BASE_URL}/{folder}/{filename}", key=key))
    if weights is None:
        raise ValueError(f"{backbone_name} depther: pretrained=True needs {key}=<path to the head checkpoint>")
    return str(weights)
