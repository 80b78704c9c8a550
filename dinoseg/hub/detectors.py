"""torch.hub entry point for the released DINOv3 detector: Plain-DETR on the ViT-7B/16, trained on COCO2017
(`dinov3_vit7b16_de`), and the official `DetectorWithProcessor` wrapper.

As for the segmentors and depthers, weights come from local files or the torch hub cache (or an explicit https
URL); nothing is downloaded implicitly. The released head file holds the detector without its backbone; it is
loaded strictly (the official hub uses ``strict=False``), by assignment into a head built on the meta device; a file
that does not fit raises one `CheckpointError` naming the missing / unexpected keys.
"""

import contextlib

import torch
from torch import nn

from ..eval.detection.models.detr import PostProcess, build_model, load_detector_head
from ..eval.detection.models.released import DetectionWeights, head_location, released_head_config
from ..models.backbones import Weights, make_backbone
from ..models.checkpoint import CheckpointError, load_state_dict_file, resolve_weights_path
from ..models.finetune import adapt_for_head_file
from ..models.precision import cast_weights


class DetectorWithProcessor(nn.Module):
    """A detector and its `PostProcess`: takes a list of normalised (3, H, W) images (or a (B, 3, H, W) batch) and
    returns per image a dict of ``scores``, ``labels`` and ``boxes`` (XYXY, in pixels of that image)."""

    def __init__(self, detector: nn.Module, postprocessor: nn.Module):
        super().__init__()
        self.detector = detector
        self.postprocessor = postprocessor

    def forward(self, samples: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = self.detector(samples)
        sizes = torch.tensor([tuple(sample.shape[-2:]) for sample in samples], device=samples[0].device)
        return self.postprocessor(outputs, target_sizes=sizes, original_target_sizes=sizes)


def _make_dinov3_detector(
    *,
    backbone_name: str,
    pretrained: bool = True,
    detector_weights: str | DetectionWeights,
    backbone_weights: str | Weights,
    check_hash: bool = False,
    hash: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backbone_options: dict | None = None,
) -> DetectorWithProcessor:
    """The official hub's detector on `backbone_name` (``dinov3_vit7b16``: 3 x 3 windows; ``dinov3_vitl16plus``:
    2 x 2, no released head: pass ``detector_weights=<path>``), in eval mode."""
    config = released_head_config(backbone_name=backbone_name)  # ValueError for a backbone without a detector
    options = dict(backbone_options or {})
    if not pretrained:
        backbone = make_backbone(backbone_name, pretrained=False, device=device, **options)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            detector = build_model(backbone, config)
        if dtype is not None:
            cast_weights(detector, dtype)
    else:
        # Check the head file first: fail before spending minutes on a multi-GB backbone.
        location = head_location(backbone_name, detector_weights, file_hash=hash)
        head = str(resolve_weights_path(location, check_hash=check_hash))
        state_dict = load_state_dict_file(head)
        backbone = make_backbone(backbone_name, pretrained=True, weights=backbone_weights, check_hash=check_hash,
                                 dtype=dtype, **options)
        backbone = adapt_for_head_file(backbone, head, backbone_name, backbone_weights)  # a local run's adapted one
        with torch.device("meta"):
            detector = build_model(backbone, config)
        load_detector_head(detector, state_dict, source=head)
        left = [n for n, t in (*detector.named_parameters(), *detector.named_buffers()) if t.is_meta]
        if left:
            raise CheckpointError(f"{head}: tensors left uninitialised after loading: {', '.join(left[:5])}")
        if dtype is not None:
            cast_weights(detector, dtype)  # the head (the backbone was stored in `dtype` as it loaded)
        if device is not None:
            detector = detector.to(device)
    # The official hub sets `num_queries` and `two_stage_num_proposals` to the one-to-one queries here; eval mode
    # does that by itself.
    return DetectorWithProcessor(detector, PostProcess(config.topk, config.reparam)).eval()


def dinov3_vit7b16_de(
    *,
    pretrained: bool = True,
    weights: DetectionWeights | str = DetectionWeights.COCO2017,
    backbone_weights: Weights | str = Weights.LVD1689M,
    check_hash: bool = False,
    hash: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backbone_options: dict | None = None,
) -> DetectorWithProcessor:
    """The released DINOv3 ViT-7B/16 COCO detector: Plain-DETR (hidden 768, 6 encoder + 6 decoder layers, 1500
    one-to-one queries at inference, boxes as deltas in pixels) on blocks [9, 19, 29, 39] of the frozen ViT-7B,
    seen through 3 x 3 windows plus a low-resolution whole view.

    Args:
        weights: the head (``dinov3_vit7b16_coco2017_detr_head-b0235ff7.pth``): a path, a ``file://`` or
            ``https://`` URL, or ``DetectionWeights.COCO2017`` for the file in the torch hub cache.
        backbone_weights: the ViT-7B checkpoint, as for :func:`dinoseg.hub.dinov3_vit7b16`.
        check_hash: compare the files' SHA-256 with the hash in their names.
        hash: the official extra keyword: another hash in the released head's file name.
        pretrained: False builds random weights (``device="meta"`` allocates nothing).
        device: where the detector ends up.
        dtype: ``torch.bfloat16`` / ``torch.float16`` store the weights (backbone and head) in half precision, the
            backbone read from its float32 file tensor by tensor; normalisations stay float32, the forward runs
            under autocast in that dtype and returns float32.
        backbone_options: architecture overrides for ``make_backbone`` (for tests).

    ``model(images)`` takes a list of normalised (3, H, W) tensors (ImageNet mean and std) and returns per image
    ``{"scores", "labels", "boxes"}``: the 1500 best (query, class) pairs, COCO category ids, XYXY boxes in
    pixels. ``model.detector`` is the `PlainDETRReParam`; the model is returned in eval mode.
    """
    return _make_dinov3_detector(backbone_name="dinov3_vit7b16", pretrained=pretrained, detector_weights=weights,
                                 backbone_weights=backbone_weights, check_hash=check_hash, hash=hash, device=device,
                                 dtype=dtype, backbone_options=backbone_options)


__all__ = ["DetectionWeights", "DetectorWithProcessor", "dinov3_vit7b16_de"]
