"""dinoseg: semantic segmentation, monocular depth and object detection on frozen DINOv3 backbones.

Public names follow the official DINOv3 code, so `from dinoseg import build_segmentation_decoder` replaces
`from dinov3.eval.segmentation.models import build_segmentation_decoder`. Where tasks share a name, the
segmentation one is here and the others at their official paths: `LinearHead` (depth:
`dinoseg.eval.depth.models.linear_head.LinearHead`), `DecoderConfig` (depth: `dinoseg.eval.depth.models.DecoderConfig`,
also exported here as `DepthDecoderConfig`), detection's `PostProcess` and `build_model`
(`dinoseg.eval.detection.models.detr`).
"""

import importlib

from .hub import __all__ as _hub_names  # the torch.hub entry points; `dinoseg.hub` imports each on first use

# Each public name and the module it comes from, imported on first use (PEP 562): `import dinoseg` imports no
# torch, and using one name imports only what it needs (no torchvision for a backbone, say).
_MODULES = {
    ".data": ("DatasetError", "InfiniteDataloader", "make_data_loader", "make_dataset"),
    ".data.datasets": (
        "ADE20K", "KITTI", "NYU", "Cityscapes", "DepthFolder", "ImageMaskFolder", "PascalVOC", "SyntheticDepth",
        "SyntheticShapes",
    ),
    ".eval.depth.config": ("DepthConfig",),
    ".eval.depth.datasets.datasets_utils": ("make_valid_mask",),
    ".eval.depth.eval": ("evaluate_depther_with_config", "evaluate_depther_with_dataloader"),
    ".eval.depth.loss": ("GradientLogLoss", "GradientLoss", "L1Loss", "LossType", "MultiLoss", "SigLoss"),
    ".eval.depth.metrics": ("DEPTH_METRICS", "calculate_depth_metrics"),
    ".eval.depth.models": (
        "Depther", "DPTHead", "FeaturesToDepth", "PatchSizeAdaptationStrategy", "build_depther", "make_depther_from_config",
    ),
    ".eval.depth.transforms": ("make_depth_eval_transforms", "make_depth_train_transforms"),
    ".eval.depth.utils": ("align_depth_least_square",),
    ".eval.detection.config": ("DetectionHeadConfig",),
    ".eval.detection.models.detr": ("PlainDETR", "PlainDETRReParam"),
    ".eval.segmentation.config": ("SegmentationConfig", "load_config"),
    ".eval.segmentation.inference": (
        "AccumulatorBuffer", "InferenceSettings", "make_inference", "make_tta_inference", "mask_classification_to_semantic",
        "slide_inference", "tta_image_size",
    ),
    ".eval.segmentation.loss": ("MultiSegmentationLoss",),
    ".eval.segmentation.m2f_loss": ("HungarianMatcher", "Mask2FormerLoss", "SetCriterion"),
    ".eval.segmentation.metrics": ("SegmentationMetrics", "calculate_intersect_and_union", "calculate_segmentation_metrics"),
    ".eval.segmentation.models": (
        "AdapterOptions", "DecoderType", "FeatureDecoder", "Mask2FormerOptions", "build_segmentation_decoder",
    ),
    ".eval.segmentation.models.backbone.dinov3_adapter": ("DINOv3_Adapter",),
    ".eval.segmentation.models.heads.linear_head": ("LinearHead",),
    ".eval.segmentation.models.heads.mask2former_head": ("Mask2FormerHead",),
    ".eval.segmentation.models.utils.ms_deform_attn": ("MSDeformAttn", "ms_deform_attn_core"),
    ".eval.segmentation.transforms": ("make_segmentation_eval_transforms", "make_segmentation_train_transforms"),
    ".eval.utils": ("BackboneLayersSet", "ModelWithIntermediateLayers", "get_backbone_out_indices"),
    ".models.backbones": ("Weights",),
    ".models.checkpoint": ("CheckpointError",),
    ".models.convnext": ("ConvNeXt",),
    ".models.vision_transformer": ("DinoVisionTransformer",),
}
_RENAMED = {"DepthDecoderConfig": (".eval.depth.models", "DecoderConfig")}  # public name: (module, name there)
_SUBPACKAGES = ("cli", "data", "engine", "eval", "hub", "layers", "models")
_SOURCE = {name: (module, name) for module, names in _MODULES.items() for name in names}
_SOURCE |= _RENAMED
_SOURCE |= {name: (".hub", name) for name in _hub_names if name not in _SOURCE}


def __getattr__(name: str):
    if name in _SUBPACKAGES:  # `import dinoseg; dinoseg.hub` as when the facade imported them all
        return importlib.import_module(f".{name}", __name__)
    if name not in _SOURCE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _SOURCE[name]
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value  # found directly next time
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = sorted(_SOURCE)  # every lazily importable name, the hub entry points included
