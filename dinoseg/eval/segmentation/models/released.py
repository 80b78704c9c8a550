"""Released DINOv3 segmentation heads: file names, hashes and where dinoseg looks for them."""

from enum import Enum
from pathlib import Path

from ....models.backbones import DINOV3_BASE_URL
from ....models.checkpoint import find_in_hub_cache


class SegmentorWeights(Enum):
    ADE20K = "ADE20K"


# Released Mask2Former heads: backbone name -> file hash.
M2F_HEAD_HASHES = {"dinov3_vit7b16": "bf307cb1"}


def official_m2f_head_filename(backbone_name: str, weights: SegmentorWeights = SegmentorWeights.ADE20K,
                               file_hash: str | None = None) -> str:
    return f"{backbone_name}_{weights.value.lower()}_m2f_head-{file_hash or M2F_HEAD_HASHES[backbone_name]}.pth"


def head_location(backbone_name: str, weights, released: bool, file_hash: str | None = None, *, key: str = "weights") -> str:
    """Where a head checkpoint is: `weights` as given, or a `SegmentorWeights` member looked up in the torch hub
    cache when `released` (the backbone has such a released head; `file_hash`: another hash in its file name).
    `key`: what takes a path instead, in messages (`weights` for the hub functions, `head` on the command line)."""
    if weights is None:
        raise ValueError(f"{backbone_name} segmentor: pretrained=True needs {key}=<path to the head checkpoint>")
    if isinstance(weights, str) and weights.upper() in SegmentorWeights.__members__:
        weights = SegmentorWeights[weights.upper()]
    if not isinstance(weights, SegmentorWeights):
        return str(weights)
    if not released:
        raise ValueError(f"{backbone_name} segmentor: there is no released {weights.value} head for it; pass {key}=<path>")
    filename = official_m2f_head_filename(backbone_name, weights, file_hash)
    found: Path = find_in_hub_cache(filename, f"the official {weights.value} Mask2Former head of {backbone_name}",
                                    f"{DINOV3_BASE_URL}/{backbone_name}/{filename}", key=key)
    return str(found)
