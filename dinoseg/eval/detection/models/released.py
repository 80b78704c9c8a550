"""The released DINOv3 detector: its head settings, file names and where dinoseg looks for them."""

from enum import Enum

from ....models.backbones import DINOV3_BASE_URL
from ....models.checkpoint import find_in_hub_cache
from . import DetectionHeadConfig
from .position_encoding import PositionEncoding


class DetectionWeights(Enum):
    COCO2017 = "COCO2017"


# Released heads: backbone name -> file hash (the official hub builds the same head on the ViT-L/16+, unreleased).
DETR_HEAD_HASHES = {"dinov3_vit7b16": "b0235ff7"}
# Windows per side of the detector on each backbone the official hub wires.
N_WINDOWS_SQRT = {"dinov3_vit7b16": 3, "dinov3_vitl16plus": 2}


# Released detectors usable by name (`head=dinov3_vit7b16_de`): their backbone.
HUB_DETECTORS = {"dinov3_vit7b16_de": "dinov3_vit7b16"}


def released_head_config(*, backbone_name: str | None = None) -> DetectionHeadConfig:
    """The COCO detector head of the official hub: 91 classes, 1500 + 1500 queries, hidden 768, 6 + 6 layers,
    box reparameterisation; backbone-dependent fields (`layers_to_use`, windows, strides) left to `build_model`.
    `backbone_name` (dinoseg's keyword): also its windows on that backbone (`n_windows_sqrt` per `N_WINDOWS_SQRT`)."""
    if backbone_name is not None and backbone_name not in N_WINDOWS_SQRT:
        raise ValueError(f"no detector for backbone {backbone_name!r}; expected one of {sorted(N_WINDOWS_SQRT)}")
    config = DetectionHeadConfig(
        with_box_refine=True,
        two_stage=True,
        mixed_selection=True,
        look_forward_twice=True,
        k_one2many=6,
        lambda_one2many=1.0,
        num_queries_one2one=1500,
        num_queries_one2many=1500,
        reparam=True,
        position_embedding=PositionEncoding.SINE,
        num_feature_levels=1,
        dec_layers=6,
        dim_feedforward=2048,
        dropout=0.0,
        norm_type="pre_norm",
        proposal_feature_levels=4,
        proposal_min_size=50,
        decoder_type="global_rpe_decomp",
        decoder_use_checkpoint=False,
        decoder_rpe_hidden_dim=512,
        decoder_rpe_type="linear",
        layers_to_use=None,
        blocks_to_train=None,
        add_transformer_encoder=True,
        num_encoder_layers=6,
        backbone_use_layernorm=False,
        num_classes=91,
        aux_loss=True,
        topk=1500,
        hidden_dim=768,
        nheads=8,
    )
    if backbone_name is not None:
        config.n_windows_sqrt = N_WINDOWS_SQRT[backbone_name]
    return config


def official_detr_head_filename(backbone_name: str, weights: DetectionWeights = DetectionWeights.COCO2017,
                                file_hash: str | None = None) -> str:
    return f"{backbone_name}_{weights.value.lower()}_detr_head-{file_hash or DETR_HEAD_HASHES[backbone_name]}.pth"


def head_location(backbone_name: str, weights, file_hash: str | None = None) -> str:
    """Where a detector head checkpoint is: `weights` as given (a path or URL), or a `DetectionWeights` member
    (or its name) looked up in the torch hub cache (`file_hash`: another hash in the released file's name)."""
    if weights is None:
        raise ValueError(f"{backbone_name} detector: pretrained=True needs weights=<path to the head checkpoint>")
    if isinstance(weights, str) and weights.upper() in DetectionWeights.__members__:
        weights = DetectionWeights[weights.upper()]
    if not isinstance(weights, DetectionWeights):
        return str(weights)
    if backbone_name not in DETR_HEAD_HASHES:
        raise ValueError(f"{backbone_name} detector: there is no released {weights.value} head for it; pass weights=<path>")
    filename = official_detr_head_filename(backbone_name, weights, file_hash)
    return str(find_in_hub_cache(filename, f"the official {weights.value} detector head of {backbone_name}",
                                 f"{DINOV3_BASE_URL}/{backbone_name}/{filename}"))


# COCO 2017's 80 categories by id (ids 1-90 with gaps: the released 91-class head's labels are these ids), so that
# predictions of the released detector are named without the annotation files.
COCO_CATEGORY_NAMES = dict(enumerate((
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", None, "backpack", "umbrella", None, None, "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", None, "dining table", None, None, "toilet", None, "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", None, "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush"), start=1))
COCO_CATEGORY_NAMES = {k: v for k, v in COCO_CATEGORY_NAMES.items() if v is not None}
