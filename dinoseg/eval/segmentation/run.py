"""Entry points behind the `dinoseg` command: train, eval, predict, demo."""

import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ... import distributed
from ...data.io import DatasetError, load_image
from .checkpointer import LAST, load_head_state_dict, read_head_weights
from .config import ConfigError
from .eval import evaluate_segmentation_model, make_val_loader, whole_image_size, write_results
from .inference import make_tta_inference
from .setup import build_eval_transforms, build_model, build_val_dataset, inference_kwargs
from .train import prepare_output_dir, train_segmentation

logger = logging.getLogger("dinoseg")


def infer_num_classes(head_weights: dict) -> int | None:
    if "segmentation_model.1.conv.weight" in head_weights:  # linear head
        return int(head_weights["segmentation_model.1.conv.weight"].shape[0])
    key = "segmentation_model.1.predictor.class_embed.weight"  # Mask2Former: + the no-object class
    return int(head_weights[key].shape[0]) - 1 if key in head_weights else None


# Released segmentors usable by name (`head=dinov3_vit7b16_ms`): the config they imply.
HUB_SEGMENTORS = {
    "dinov3_vit7b16_ms": {"model.dino_hub": "dinov3_vit7b16", "decoder_head.type": "m2f", "decoder_head.hidden_dim": 2048,
                          "decoder_head.num_classes": 150, "decoder_head.backbone_out_layers": "FOUR_EVEN_INTERVALS"},
}


def _apply_hub_segmentor(cfg: DictConfig, name: str) -> str:
    """Set the architecture of a released segmentor in `cfg`; return its head file (torch hub cache)."""
    from ...hub.segmentors import SegmentorWeights, _head_location

    for key, value in HUB_SEGMENTORS[name].items():
        OmegaConf.update(cfg, key, value, merge=False)
    return _head_location(HUB_SEGMENTORS[name]["model.dino_hub"], SegmentorWeights.ADE20K, official=True)


def load_segmentor(cfg: DictConfig, head_path: str | None, device: torch.device, num_classes: int | None = None):
    """The configured segmentor with a trained head; `num_classes` falls back to the head checkpoint's.
    `head_path` may also name a released segmentor (`dinov3_vit7b16_ms`)."""
    if not head_path:
        raise ConfigError("load_from: a head checkpoint is required (load_from=PATH or head=PATH)")
    if head_path in HUB_SEGMENTORS:
        head_path = _apply_hub_segmentor(cfg, head_path)
    weights = read_head_weights(head_path)
    num_classes = cfg.decoder_head.num_classes or num_classes or infer_num_classes(weights)
    if num_classes is None:
        raise ConfigError("decoder_head.num_classes: cannot infer it from the head checkpoint; set it")
    model = build_model(cfg, num_classes)
    load_head_state_dict(model, weights, source=str(head_path))
    return model.to(device).eval(), num_classes


def run_eval(cfg: DictConfig) -> dict:
    device = distributed.setup(cfg.device)
    out = prepare_output_dir(cfg.output_dir) if distributed.is_main_process() else Path(cfg.output_dir)
    dataset = build_val_dataset(cfg)
    model, num_classes = load_segmentor(cfg, cfg.load_from, device, dataset.num_classes)
    save_dir = None
    if cfg.eval.save_predictions:
        save_dir = out / "predictions"
        save_dir.mkdir(parents=True, exist_ok=True)
    results = evaluate_segmentation_model(model, make_val_loader(dataset, cfg), cfg, num_classes, device,
                                          getattr(dataset, "class_names", None), save_dir=save_dir)
    if distributed.is_main_process():
        write_results(results, out)
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


def _dataset_palette(cfg: DictConfig):
    # Predicting needs no dataset: when the configured one is not on this machine, colours are generated.
    try:
        dataset = build_val_dataset(cfg)
    except (DatasetError, FileNotFoundError):
        return None, None
    return getattr(dataset, "palette", None), getattr(dataset, "class_names", None)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(inputs: list[str]) -> list[Path]:
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            paths.append(p)
        else:
            raise ConfigError(f"{p}: input image or folder not found")
    if not paths:
        raise ConfigError(f"no images found in {inputs}")
    return paths


@torch.no_grad()
def run_predict(cfg: DictConfig | None, inputs: list[str], output: str, model=None, num_classes=None, *,
                onnx: str | None = None) -> list[Path]:
    """Colour masks (`<name>_mask.png`), overlays (`<name>_overlay.png`) and raw class ids (`<name>_label.png`).
    `onnx`: an exported segmentor run by onnxruntime on the CPU, with the settings in its metadata (no `cfg`)."""
    device = torch.device("cpu") if onnx else distributed.setup(cfg.device)
    images = list_images(inputs)
    out = prepare_output_dir(output)
    if onnx:
        from .onnx_runtime import OnnxSegmentor

        model = OnnxSegmentor(onnx)
        num_classes, palette = model.num_classes, model.palette
        transform, kwargs = model.eval_transforms(), model.inference_kwargs()
    else:
        if model is None:
            model, num_classes = load_segmentor(cfg, cfg.load_from, device)
        palette, _ = _dataset_palette(cfg)
        transform, kwargs = build_eval_transforms(cfg), inference_kwargs(cfg)
    if not palette or len(palette) < num_classes:
        palette = default_palette(num_classes)
    lut = np.array(palette, dtype=np.uint8)
    written = []
    for path in images:
        raw = load_image(str(path))  # uint8 [3, H, W], any mode -> RGB
        dummy = torch.zeros(raw.shape[-2:], dtype=torch.int64)
        image, _ = transform(raw, dummy)
        image = image.unsqueeze(0).to(device)
        if kwargs["inference_mode"] == "whole":
            kwargs["crop_size"] = model.whole_image_size(image) if onnx else whole_image_size(image, model)
        probs = make_tta_inference(image, model, rescale_to=tuple(raw.shape[-2:]), **kwargs)
        pred = probs.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
        colour = lut[pred]
        rgb = raw.permute(1, 2, 0).numpy()
        overlay = (0.5 * rgb + 0.5 * colour).astype(np.uint8)
        for suffix, array in (("mask", colour), ("overlay", overlay), ("label", pred)):
            target = out / f"{path.stem}_{suffix}.png"
            Image.fromarray(array).save(target)
            written.append(target)
    return written


def plot_history(run_dir: Path) -> Path:
    """loss and validation mIoU over iterations, from metrics.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [(r["iteration"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["iteration"], r["val"]["mIoU"]) for r in rows if "val" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax[0].plot(*zip(*train), marker=".")
    ax[0].set(title="training loss", xlabel="iteration", ylabel="loss")
    if val:
        ax[1].plot(*zip(*val), marker="o", color="tab:green")
    ax[1].set(title="validation mIoU", xlabel="iteration", ylabel="mIoU", ylim=(0, 1))
    fig.tight_layout()
    path = run_dir / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(cfg: DictConfig) -> dict:
    """Train on the synthetic set, evaluate, print the per-class table, save predictions and curves."""
    from .eval import format_metrics_table

    results = train_segmentation(cfg)
    out = Path(cfg.output_dir)
    if not distributed.is_main_process():
        return results
    print(format_metrics_table(results))
    model, num_classes = load_segmentor(cfg, str(out / LAST), distributed.resolve_device(cfg.device))
    dataset = build_val_dataset(cfg)
    sample_dir = out / "demo_inputs"
    sample_dir.mkdir(exist_ok=True)
    for i in range(min(4, len(dataset))):
        Image.fromarray(dataset.load_image(i).permute(1, 2, 0).numpy()).save(sample_dir / f"sample_{i}.png")
    run_predict(cfg, [str(sample_dir)], str(out / "predictions"), model=model, num_classes=num_classes)
    curves = plot_history(out)
    print(f"mIoU {results['mIoU']:.4f} (chance level about {1 / num_classes:.3f}); run directory: {out}")
    print(f"curves: {curves}; predictions: {out / 'predictions'}")
    return results
