"""dinoseg: semantic segmentation on frozen DINOv3 backbones.

Public names follow the official DINOv3 code, so `from dinoseg import build_segmentation_decoder` replaces
`from dinov3.eval.segmentation.models import build_segmentation_decoder`.
"""

from .data import DatasetError, InfiniteDataloader, make_data_loader, make_dataset
from .data.datasets import ADE20K, Cityscapes, ImageMaskFolder, PascalVOC, SyntheticShapes
from .eval.segmentation.config import SegmentationConfig, load_config
from .eval.segmentation.inference import (
    AccumulatorBuffer,
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
from .eval.segmentation.models import FeatureDecoder, build_segmentation_decoder
from .eval.segmentation.models.backbone.dinov3_adapter import DINOv3_Adapter
from .eval.segmentation.models.heads.linear_head import LinearHead
from .eval.segmentation.models.heads.mask2former_head import Mask2FormerHead
from .eval.segmentation.models.utils.ms_deform_attn import MSDeformAttn, ms_deform_attn_core
from .eval.segmentation.transforms import make_segmentation_eval_transforms, make_segmentation_train_transforms
from .eval.utils import BackboneLayersSet, ModelWithIntermediateLayers, get_backbone_out_indices
from .hub.backbones import (
    Weights,
    dinov3_convnext_base,
    dinov3_convnext_large,
    dinov3_convnext_small,
    dinov3_convnext_tiny,
    dinov3_vit7b16,
    dinov3_vitb16,
    dinov3_vith16plus,
    dinov3_vitl16,
    dinov3_vitl16plus,
    dinov3_vits16,
    dinov3_vits16plus,
)
from .hub.segmentors import SegmentorWeights, dinov3_vit7b16_ms
from .models.convnext import ConvNeXt
from .models.vision_transformer import DinoVisionTransformer

__version__ = "0.1.0"

__all__ = [
    "AccumulatorBuffer",
    "ADE20K",
    "BackboneLayersSet",
    "Cityscapes",
    "ConvNeXt",
    "DINOv3_Adapter",
    "DatasetError",
    "DinoVisionTransformer",
    "FeatureDecoder",
    "HungarianMatcher",
    "ImageMaskFolder",
    "InfiniteDataloader",
    "LinearHead",
    "MSDeformAttn",
    "Mask2FormerHead",
    "Mask2FormerLoss",
    "ModelWithIntermediateLayers",
    "MultiSegmentationLoss",
    "PascalVOC",
    "SegmentationConfig",
    "SegmentationMetrics",
    "SegmentorWeights",
    "SetCriterion",
    "SyntheticShapes",
    "Weights",
    "build_segmentation_decoder",
    "calculate_intersect_and_union",
    "calculate_segmentation_metrics",
    "dinov3_convnext_base",
    "dinov3_convnext_large",
    "dinov3_convnext_small",
    "dinov3_convnext_tiny",
    "dinov3_vit7b16",
    "dinov3_vit7b16_ms",
    "dinov3_vitb16",
    "dinov3_vith16plus",
    "dinov3_vitl16",
    "dinov3_vitl16plus",
    "dinov3_vits16",
    "dinov3_vits16plus",
    "get_backbone_out_indices",
    "load_config",
    "make_data_loader",
    "make_dataset",
    "make_inference",
    "make_segmentation_eval_transforms",
    "make_segmentation_train_transforms",
    "make_tta_inference",
    "mask_classification_to_semantic",
    "ms_deform_attn_core",
    "slide_inference",
    "tta_image_size",
]
