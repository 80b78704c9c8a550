"""dinoseg: semantic segmentation, monocular depth and object detection on frozen DINOv3 backbones.

Public names follow the official DINOv3 code, so `from dinoseg import build_segmentation_decoder` replaces
`from dinov3.eval.segmentation.models import build_segmentation_decoder`. Where tasks share a name, the
segmentation one is here and the others at their official paths: `LinearHead` (depth:
`dinoseg.eval.depth.models.linear_head.LinearHead`), `DecoderConfig` (depth: `dinoseg.eval.depth.models.DecoderConfig`,
also exported here as `DepthDecoderConfig`), detection's `PostProcess` and `build_model`
(`dinoseg.eval.detection.models.detr`).
"""

from .data import DatasetError, InfiniteDataloader, make_data_loader, make_dataset
from .data.datasets import (
    ADE20K,
    KITTI,
    NYU,
    Cityscapes,
    DepthFolder,
    ImageMaskFolder,
    PascalVOC,
    SyntheticDepth,
    SyntheticShapes,
)
from .eval.depth.config import DepthConfig
from .eval.depth.datasets.datasets_utils import make_valid_mask
from .eval.depth.eval import evaluate_depther_with_config, evaluate_depther_with_dataloader
from .eval.depth.loss import GradientLogLoss, GradientLoss, L1Loss, LossType, MultiLoss, SigLoss
from .eval.depth.metrics import DEPTH_METRICS, calculate_depth_metrics
from .eval.depth.models import DecoderConfig as DepthDecoderConfig
from .eval.depth.models import (
    Depther,
    DPTHead,
    FeaturesToDepth,
    PatchSizeAdaptationStrategy,
    build_depther,
    make_depther_from_config,
)
from .eval.depth.transforms import make_depth_eval_transforms, make_depth_train_transforms
from .eval.depth.utils import align_depth_least_square
from .eval.detection.config import DetectionHeadConfig
from .eval.detection.models.detr import PlainDETR, PlainDETRReParam
from .eval.segmentation.config import SegmentationConfig, load_config
from .eval.segmentation.inference import (
    AccumulatorBuffer,
    InferenceSettings,
    make_inference,
    make_tta_inference,
    mask_classification_to_semantic,
    slide_inference,
    tta_image_size,
)
from .eval.segmentation.loss import MultiSegmentationLoss
from .eval.segmentation.m2f_loss import HungarianMatcher, Mask2FormerLoss, SetCriterion
from .eval.segmentation.metrics import (
    SegmentationMetrics,
    calculate_intersect_and_union,
    calculate_segmentation_metrics,
)
from .eval.segmentation.models import (
    AdapterOptions,
    DecoderType,
    FeatureDecoder,
    Mask2FormerOptions,
    build_segmentation_decoder,
)
from .eval.segmentation.models.backbone.dinov3_adapter import DINOv3_Adapter
from .eval.segmentation.models.heads.linear_head import LinearHead
from .eval.segmentation.models.heads.mask2former_head import Mask2FormerHead
from .eval.segmentation.models.utils.ms_deform_attn import MSDeformAttn, ms_deform_attn_core
from .eval.segmentation.transforms import make_segmentation_eval_transforms, make_segmentation_train_transforms
from .eval.utils import BackboneLayersSet, ModelWithIntermediateLayers, get_backbone_out_indices
from .hub import *  # noqa: F403  (the torch.hub entry points)
from .hub import __all__ as _hub_names
from .models.backbones import Weights
from .models.checkpoint import CheckpointError
from .models.convnext import ConvNeXt
from .models.vision_transformer import DinoVisionTransformer

__version__ = "0.1.0"

__all__ = [
    "AccumulatorBuffer",
    "ADE20K",
    "AdapterOptions",
    "BackboneLayersSet",
    "CheckpointError",
    "Cityscapes",
    "ConvNeXt",
    "DEPTH_METRICS",
    "DINOv3_Adapter",
    "DPTHead",
    "DatasetError",
    "DecoderType",
    "DepthConfig",
    "DepthDecoderConfig",
    "DepthFolder",
    "Depther",
    "DetectionHeadConfig",
    "DinoVisionTransformer",
    "FeatureDecoder",
    "FeaturesToDepth",
    "GradientLogLoss",
    "GradientLoss",
    "HungarianMatcher",
    "ImageMaskFolder",
    "InferenceSettings",
    "InfiniteDataloader",
    "KITTI",
    "L1Loss",
    "LinearHead",
    "LossType",
    "MSDeformAttn",
    "Mask2FormerHead",
    "Mask2FormerLoss",
    "Mask2FormerOptions",
    "ModelWithIntermediateLayers",
    "MultiLoss",
    "MultiSegmentationLoss",
    "NYU",
    "PascalVOC",
    "PatchSizeAdaptationStrategy",
    "PlainDETR",
    "PlainDETRReParam",
    "SegmentationConfig",
    "SegmentationMetrics",
    "SetCriterion",
    "SigLoss",
    "SyntheticDepth",
    "SyntheticShapes",
    "Weights",
    "align_depth_least_square",
    "build_depther",
    "build_segmentation_decoder",
    "calculate_depth_metrics",
    "calculate_intersect_and_union",
    "calculate_segmentation_metrics",
    "evaluate_depther_with_config",
    "evaluate_depther_with_dataloader",
    "get_backbone_out_indices",
    "load_config",
    "make_data_loader",
    "make_dataset",
    "make_depth_eval_transforms",
    "make_depth_train_transforms",
    "make_depther_from_config",
    "make_inference",
    "make_segmentation_eval_transforms",
    "make_segmentation_train_transforms",
    "make_tta_inference",
    "make_valid_mask",
    "mask_classification_to_semantic",
    "ms_deform_attn_core",
    "slide_inference",
    "tta_image_size",
]
__all__ += _hub_names
