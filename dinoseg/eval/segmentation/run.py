"""The segmentation task behind the `dinoseg` command: train, eval, predict, demo, check-data."""

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ...data import make_dataset
from ...data.check import check_dataset, format_report
from ...data.io import DatasetError
from ...engine import distributed, reporting
from ...engine.checkpoint import LAST, read_head_weights
from ...engine.config import ConfigError
from ...engine.export import check_output_path
from ...engine.predict import list_images, predict_images, save_sample_images
from ...engine.rundir import eval_dir, prepare_output_dir
from ...engine.training import evaluation_loader
from ...models.checkpoint import CheckpointError
from .config import SegmentationConfig, config_from_layers
from .decoders import head_type_of, resolve_num_classes
from .eval import RESULTS_FILENAME, evaluate_segmentation_model, format_metrics_table, write_results
from .export import DEFAULT_OPSET, FORMAT, deployment_metadata, export_onnx
from .inference import AccumulatorBuffer
from .models import DecoderType
from .models.released import SegmentorWeights, head_location
from .official_config import SEGMENTATION
from .setup import build_eval_transforms, build_model_with_head, build_val_dataset, inference_settings
from .train import train_segmentation

logger = logging.getLogger("dinoseg")

NAME = "segmentation"
SCHEMA = SegmentationConfig
DEMO_CONFIG = "demo.yaml"
OFFICIAL = SEGMENTATION  # the official config schema's segmentation keys
ONNX_FORMAT = FORMAT  # the metadata `format` of the files `dinoseg export` writes (`predict --onnx` picks the task by it)

# Released segmentors usable by name (`head=dinov3_vit7b16_ms`): the config they imply.
HUB_SEGMENTORS = {
    "dinov3_vit7b16_ms": {"model.dino_hub": "dinov3_vit7b16", "decoder_head.type": "M2F", "decoder_head.hidden_dim": 2048,
                          "decoder_head.num_classes": 150, "decoder_head.backbone_out_layers": "FOUR_EVEN_INTERVALS"},
}


def load_segmentor(cfg: DictConfig, device: torch.device):
    """The configured segmentor with the trained head `cfg.head` (a checkpoint, or a released segmentor's name);
    returns (model in eval mode, number of classes)."""
    head_path = cfg.head
    if not head_path:
        raise ConfigError("head: a head checkpoint is required (head=PATH)")
    if head_path in HUB_SEGMENTORS:
        for key, value in HUB_SEGMENTORS[head_path].items():
            OmegaConf.update(cfg, key, value, merge=False)
        head_path = head_location(cfg.model.dino_hub, SegmentorWeights.ADE20K, released=True, key="head")
    configured = DecoderType(cfg.decoder_head.type)
    weights = read_head_weights(head_path, task=NAME, head_type=configured.value)
    found = head_type_of(weights)
    if found is None:
        keys = ", ".join(sorted(weights)[:3])
        raise CheckpointError(f"{head_path}: not a segmentation head (no linear or Mask2Former head keys; it holds "
                              f"{len(weights)} tensors: {keys}{', ...' if len(weights) > 3 else ''})")
    if found is not configured:
        raise CheckpointError(f"{head_path}: this is a {found.value} head but the config has decoder_head.type="
                              f"{configured.value}: set decoder_head.type={found.value}")
    num_classes = resolve_num_classes(cfg.decoder_head, head_state_dict=weights)
    model = build_model_with_head(cfg, num_classes, str(head_path))
    return model.to(device).eval(), num_classes


def run_eval(cfg: DictConfig) -> dict:
    device = distributed.setup(cfg.device)
    dataset = build_val_dataset(cfg)
    model, num_classes = load_segmentor(cfg, device)
    loader = evaluation_loader(dataset, num_workers=min(cfg.train.num_workers, 2), seed=cfg.seed,
                               max_samples=cfg.eval.max_val_samples)
    out = eval_dir(cfg.output_dir, cfg.head)
    save_dir = out / "predictions" if cfg.eval.save_predictions else None
    if distributed.is_main_process():  # everything is checked: now the outputs
        prepare_output_dir(save_dir or out)
    distributed.barrier()
    results = evaluate_segmentation_model(model, loader, device, num_classes=num_classes, settings=inference_settings(cfg),
                                          class_names=getattr(dataset, "class_names", None), save_dir=save_dir)
    if distributed.is_main_process():
        write_results(results, out)
        print(format_metrics_table(results))
        print(f"results: {out / RESULTS_FILENAME}")
    return results


def default_palette(n: int) -> list[tuple[int, int, int]]:
    # The Pascal VOC bit-interleaving colour map: distinct colours for any number of classes.
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


def dataset_palette(cfg: DictConfig) -> tuple[list | None, list | None]:
    """(palette, class names) of the configured validation set, (None, None) when it is not on this machine:
    predicting and exporting need no dataset (colours are then generated)."""
    try:
        dataset = build_val_dataset(cfg)
    except (DatasetError, FileNotFoundError):
        return None, None
    return getattr(dataset, "palette", None), getattr(dataset, "class_names", None)


OUTPUT_SUFFIXES = ("mask", "overlay", "label")


@torch.no_grad()
def run_predict(cfg: DictConfig | None, inputs: list[str], output: str, model=None, num_classes=None, *,
                onnx: str | None = None) -> list[Path]:
    """Colour masks (`<name>_mask.png`), overlays (`<name>_overlay.png`) and raw class ids (`<name>_label.png`).
    An unreadable image is reported and skipped; the others are still segmented, then the command fails naming
    every image it skipped. `onnx`: an exported segmentor run by onnxruntime on the CPU, with the settings in its
    metadata (then no `cfg`)."""
    images = list_images(inputs, Path(output))
    if onnx:
        from .onnx_runtime import OnnxSegmentor

        device = torch.device("cpu")
        model = OnnxSegmentor(onnx)
        num_classes, palette = model.num_classes, model.palette
        transform, settings = model.eval_transforms(), model.inference_settings()
    else:
        device = distributed.setup(cfg.device)
        if model is None:
            model, num_classes = load_segmentor(cfg, device)
        palette = dataset_palette(cfg)[0]
        transform, settings = build_eval_transforms(cfg), inference_settings(cfg)
    if not palette or len(palette) < num_classes:
        palette = default_palette(num_classes)
    lut = np.array(palette, dtype=np.uint8)
    buffer = AccumulatorBuffer()

    def segment(raw: torch.Tensor, name: Path) -> list[Path]:
        dummy = torch.zeros(raw.shape[-2:], dtype=torch.int64)
        image, _ = transform(raw, dummy)
        probs = settings(image.unsqueeze(0).to(device), model, rescale_to=tuple(raw.shape[-2:]), buffer=buffer)
        pred = probs.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
        colour = lut[pred]
        overlay = (0.5 * raw.permute(1, 2, 0).numpy() + 0.5 * colour).astype(np.uint8)
        targets = [name.parent / f"{name.name}_{suffix}.png" for suffix in OUTPUT_SUFFIXES]
        for target, array in zip(targets, (colour, overlay, pred)):
            Image.fromarray(array).save(target)
        return targets

    return predict_images(images, output, segment)


def run_demo(cfg: DictConfig) -> dict:
    """Train on the synthetic set, evaluate, print the per-class table, save predictions and curves."""
    results = train_segmentation(cfg)
    out = Path(cfg.output_dir)
    if not distributed.is_main_process():
        return results
    print(format_metrics_table(results))
    cfg.head = str(out / LAST)
    model, num_classes = load_segmentor(cfg, distributed.resolve_device(cfg.device))
    dataset = build_val_dataset(cfg)
    sample_dir = save_sample_images(dataset, out / "demo_inputs")
    run_predict(cfg, [str(sample_dir)], str(out / "predictions"), model=model, num_classes=num_classes)
    curves = reporting.plot_history(out, {"mIoU": (0, 1)})
    print(f"mIoU {results['mIoU']:.4f} (chance level about {1 / num_classes:.3f}); run directory: {out}")
    print(f"curves: {curves}; predictions: {out / 'predictions'}")
    return results


def run_check_data(cfg: DictConfig, split: str) -> int:
    """Walk one split once; print every problem by file and the class histogram. Exit status 1 on problems."""
    dataset = make_dataset(cfg.datasets[split], default_root=cfg.datasets.root, strict=False)
    report = check_dataset(dataset, progress=True)
    print(format_report(report))
    return 0 if not report.problems else 1


def run_export(cfg: DictConfig, output: str, image_size=None, opset: int = DEFAULT_OPSET) -> Path:
    """`dinoseg export`: the configured segmentor with its trained head (`head=`) as one ONNX file, with the
    preprocessing, inference settings, class names and palette in its metadata."""
    output = check_output_path(output)  # before minutes of loading a large backbone
    model, num_classes = load_segmentor(cfg, torch.device("cpu"))
    palette, class_names = dataset_palette(cfg)
    if not palette or len(palette) < num_classes:
        palette = default_palette(num_classes)
    if class_names is not None and len(class_names) != num_classes:
        logger.warning("export: the dataset names %d classes, the head has %d: exported without class names",
                       len(class_names), num_classes)
        class_names = None
    settings = inference_settings(cfg)
    metadata = deployment_metadata(
        mean=tuple(cfg.transforms.mean), std=tuple(cfg.transforms.std), resize_short_side=cfg.transforms.eval.img_size,
        inference_mode=settings.mode.value, crop_size=settings.crop_size[0], stride=settings.stride[0],
        tta_ratios=settings.tta_ratios, flip=settings.use_flip, class_names=class_names, palette=list(palette)[:num_classes],
    )
    path = export_onnx(model, output, image_size=image_size, opset=opset, metadata=metadata)
    print(f"wrote {path}")
    return path


def main(command: str, cfg: DictConfig | None, args) -> int:
    """Run one `dinoseg` subcommand on a loaded segmentation config (none for `predict --onnx`)."""
    if command == "train":
        train_segmentation(cfg)
    elif command == "eval":
        run_eval(cfg)
    elif command == "predict":
        run_predict(cfg, args.input, args.output, onnx=args.onnx)
    elif command == "export":
        run_export(cfg, args.output, args.size, args.opset)
    elif command == "demo":
        run_demo(cfg)
    elif command == "check-data":
        return run_check_data(cfg, args.split)
    else:  # a command the parser knows and this task does not: never a silent success
        raise ConfigError(f"dinoseg {command}: the segmentation task has no such command")
    return 0


__all__ = ["DEMO_CONFIG", "NAME", "OFFICIAL", "ONNX_FORMAT", "SCHEMA", "config_from_layers", "main", "run_demo", "run_eval",
           "run_export", "run_predict"]
