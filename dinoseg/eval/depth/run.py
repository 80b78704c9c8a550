"""The depth task behind the `dinoseg` command: train, eval, predict, demo, check-data."""

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from ...data import DepthDataset, make_dataset
from ...data.depth_check import check_depth_dataset, format_depth_report
from ...engine import distributed, reporting
from ...engine.checkpoint import LAST, read_head_weights
from ...engine.config import ConfigError
from ...engine.export import DEFAULT_OPSET, check_output_path
from ...engine.predict import list_images, predict_images, save_sample_images
from ...engine.rundir import eval_dir, prepare_output_dir
from .config import DepthConfig, config_from_layers
from .eval import RESULTS_FILENAME, evaluate_depth_model, format_results, write_results
from .export import FORMAT, deployment_metadata, export_onnx
from .models.released import RELEASED_DEPTHERS, dpt_depther_config, head_location
from .official_config import DEPTH
from .setup import build_model_with_head, build_test_dataset, evaluation_settings, result_config
from .train import dataset_name, evaluation_loader_of, train_depth
from .visualization_utils import depth_tensor_to_colorized_pil

logger = logging.getLogger("dinoseg")

NAME = "depth"
SCHEMA = DepthConfig
DEMO_CONFIG = "demo_depth.yaml"
OFFICIAL = DEPTH  # the official config schema's depth keys
ONNX_FORMAT = FORMAT  # the metadata `format` of the files `dinoseg export` writes (`predict --onnx` picks the task by it)


def _use_released(cfg: DictConfig, name: str) -> str:
    """Set the config's backbone and head to the released depther `name`; return its head file (hub cache)."""
    backbone, weights = RELEASED_DEPTHERS[name]
    OmegaConf.update(cfg, "model.dino_hub", backbone, merge=False)
    for key, value in dataclasses.asdict(dpt_depther_config(backbone)).items():
        OmegaConf.update(cfg, f"decoder_head.{key}", value, merge=False)
    return head_location(backbone, weights, weights, key="head")


def load_depther(cfg: DictConfig, device: torch.device) -> nn.Module:
    """The configured depther with the trained head `cfg.head` (a checkpoint of ours, the official trainer's
    `model_final.pth`, a released head file, or a released depther's name), in eval mode."""
    head = cfg.head
    if not head:
        raise ConfigError(f"head: a head checkpoint is required (head=PATH, or head={next(iter(RELEASED_DEPTHERS))})")
    if head in RELEASED_DEPTHERS:
        head = _use_released(cfg, head)
    # Read (and checked) before an expensive backbone is built.
    weights = read_head_weights(head, task=NAME, head_type=str(cfg.decoder_head.type))
    return build_model_with_head(cfg, weights, source=str(head)).to(device).eval()


def run_eval(cfg: DictConfig) -> dict:
    """`datasets.test` (else `datasets.val`) with flip TTA per `eval.use_tta`: per-image metrics then their mean,
    `results-depth.csv` / `.json` (and visualisations with `result_config.save_results`) in `eval_dir`."""
    device = distributed.setup(cfg.device)
    dataset = build_test_dataset(cfg)
    model = load_depther(cfg, device)
    loader = evaluation_loader_of(dataset, cfg)
    out = eval_dir(cfg.output_dir, cfg.head)
    saving = result_config(cfg)
    if distributed.is_main_process():  # everything is checked: now the outputs
        prepare_output_dir(out / "visualizations" if saving.save_results else out)
    distributed.barrier()
    results = evaluate_depth_model(model, loader, evaluation_settings(cfg, use_tta=cfg.eval.use_tta), device,
                                   sample_name=dataset.sample_name, result_config=saving, save_dir=out)
    if distributed.is_main_process():
        write_results(results, out, dataset_name(cfg.datasets.test or cfg.datasets.val), cfg.metrics)
        print(format_results(results, cfg.metrics))
        print(f"results: {out / RESULTS_FILENAME}")
    return results


PNG_DEPTH_SCALE = 1000.0  # predicted depth PNGs: 16-bit millimetres, 0 = invalid, as NYU stores depth
OUTPUT_SUFFIXES = ("depth", "color")


def depth_to_png16(depth: torch.Tensor) -> tuple[np.ndarray, int]:
    """Depth in metres [H, W] -> (uint16 millimetres, number of pixels clipped at 65.535 m); every predicted pixel
    is valid, so the smallest value written is 1 mm (0 means "no depth")."""
    mm = (depth.double() * PNG_DEPTH_SCALE).round()
    clipped = int((mm > 65535).sum())
    return mm.clamp(1, 65535).to(torch.int32).numpy().astype(np.uint16), clipped


def _eval_image_size(cfg: DictConfig):
    size = cfg.transforms.eval.img_size
    return size if size is None or isinstance(size, int) else tuple(size)


@torch.no_grad()
def run_predict(cfg: DictConfig | None, inputs: list[str], output: str, model=None, *, onnx: str | None = None) -> list[Path]:
    """Depth maps of images: `<name>_depth.png` (16-bit, millimetres) and `<name>_color.png` (colour-mapped over the
    image's own depth range), at the image's size, with flip TTA per `eval.use_tta`. An unreadable image is
    reported and skipped; the others are still processed, then the command fails naming every image it skipped.
    `onnx`: an exported depther run by onnxruntime on the CPU, with the settings in its metadata (then no `cfg`)."""
    from .transforms import LeftRightFlipAug, make_depth_eval_transforms  # torchvision, imported where used

    images = list_images(inputs, Path(output))
    if onnx:
        from .onnx_runtime import OnnxDepther

        device = torch.device("cpu")
        model = OnnxDepther(onnx)
        transform, use_tta = model.eval_transforms(), model.flip
    else:
        device = distributed.setup(cfg.device)
        if model is None:
            model = load_depther(cfg, device)
        # The whole image (no fixed crop); the depth passed along is a placeholder.
        t = cfg.transforms
        transform = make_depth_eval_transforms(img_size=_eval_image_size(cfg), mean=tuple(t.mean), std=tuple(t.std))
        use_tta = bool(cfg.eval.use_tta)
    flip = LeftRightFlipAug(flip=use_tta)

    def estimate(raw: torch.Tensor, name: Path) -> list[Path]:
        (image,), _ = transform(raw, torch.zeros(1, *raw.shape[-2:]))
        x = image.unsqueeze(0).to(device)
        views = torch.cat([x, torch.flip(x, dims=[-1])]) if use_tta else x
        depth = flip.inverse(model(views).float())
        depth = F.interpolate(depth, size=tuple(raw.shape[-2:]), mode="bilinear", align_corners=False)[0, 0].cpu()
        mm, clipped = depth_to_png16(depth)
        if clipped:
            logger.warning("%s: %d pixels beyond 65.535 m written as 65535 mm", name, clipped)
        targets = [name.parent / f"{name.name}_{suffix}.png" for suffix in OUTPUT_SUFFIXES]
        Image.fromarray(mm).save(targets[0])
        depth_tensor_to_colorized_pil(depth).save(targets[1])
        return targets

    return predict_images(images, output, estimate)


def run_export(cfg: DictConfig, output: str, image_size=None, opset: int = DEFAULT_OPSET) -> Path:
    """`dinoseg export`: the configured depther with its trained head (`head=`) as one ONNX file, with the
    preprocessing and the flip TTA of `dinoseg predict` in its metadata."""
    output = check_output_path(output)  # before minutes of loading a large backbone
    model = load_depther(cfg, torch.device("cpu"))
    t = cfg.transforms
    size = _eval_image_size(cfg)
    metadata = deployment_metadata(mean=tuple(t.mean), std=tuple(t.std), img_size=list(size) if isinstance(size, tuple) else size,
                                   flip=bool(cfg.eval.use_tta))
    path = export_onnx(model, output, image_size=image_size, opset=opset, metadata=metadata)
    print(f"wrote {path}")
    return path


class ConstantDepth(nn.Module):
    """A 'depther' that predicts the same depth everywhere: the baseline every trained head must beat."""

    def __init__(self, depth: float):
        super().__init__()
        self.depth = float(depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_full((x.shape[0], 1, *x.shape[-2:]), self.depth)


def mean_training_depth(cfg: DictConfig, max_samples: int = 500) -> float:
    """Mean valid depth (metres) of the training set, before augmentation (at most `max_samples` images)."""
    dataset = make_dataset(cfg.datasets.train, default_root=cfg.datasets.root)
    total, count = 0.0, 0
    for i in np.linspace(0, len(dataset) - 1, min(len(dataset), max_samples)).round().astype(int):
        depth = dataset.load_depth(int(i))
        valid = depth[depth > 0].double() / cfg.transforms.normalization_constant
        total, count = total + float(valid.sum()), count + valid.numel()
    return total / max(count, 1)


def run_demo(cfg: DictConfig) -> dict:
    """Train on the synthetic set, evaluate, compare with predicting the mean depth, save predictions and curves."""
    results = train_depth(cfg)
    out = Path(cfg.output_dir)
    if not distributed.is_main_process():
        return results
    device = distributed.resolve_device(cfg.device)
    dataset = build_test_dataset(cfg)
    mean = mean_training_depth(cfg)
    baseline = evaluate_depth_model(ConstantDepth(mean), evaluation_loader_of(dataset, cfg),
                                    evaluation_settings(cfg, use_tta=False), device)
    cfg.head = str(out / LAST)
    sample_dir = save_sample_images(dataset, out / "demo_inputs")
    run_predict(cfg, [str(sample_dir)], str(out / "predictions"), model=load_depther(cfg, device))
    curves = reporting.plot_history(out, {m: (0, 1) if m in ("a1", "a2", "a3") else None for m in cfg.metrics})
    print(f"trained head:            {format_results(results, cfg.metrics)}")
    print(f"mean depth ({mean:.2f} m):   {format_results(baseline, cfg.metrics)}")
    print(f"run directory: {out}; curves: {curves}; predictions: {out / 'predictions'}")
    return results | {"baseline": {m: baseline[m] for m in cfg.metrics}}


def run_check_data(cfg: DictConfig, split: str) -> int:
    """Walk one split once; print every problem by file and the depth statistics. Exit status 1 on problems
    (a depth unit other than `transforms.normalization_constant` is one, and so are depth maps whose units look wrong,
    unless `datasets.check_units` is false)."""
    dataset = make_dataset(cfg.datasets[split], default_root=cfg.datasets.root, strict=False)
    if not isinstance(dataset, DepthDataset):
        raise ConfigError(f"datasets.{split}={cfg.datasets[split]!r}: {type(dataset).__name__} is not a depth dataset")
    report = check_depth_dataset(dataset, progress=True, units_are_problems=cfg.datasets.check_units)
    print(format_depth_report(report))
    constant = cfg.transforms.normalization_constant
    if not math.isclose(dataset.depth_scale, constant, rel_tol=1e-6):
        print(f"transforms.normalization_constant={constant:g} but this dataset stores {dataset.depth_scale:g} "
              f"units per metre: depths would be off by a factor {constant / dataset.depth_scale:g}")
        return 1
    return 0 if report.ok else 1


def main(command: str, cfg: DictConfig | None, args) -> int:
    """Run one `dinoseg` subcommand on a loaded depth config (none for `predict --onnx`)."""
    if command == "train":
        train_depth(cfg)
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
        raise ConfigError(f"dinoseg {command}: the depth task has no such command")
    return 0


__all__ = ["DEMO_CONFIG", "NAME", "OFFICIAL", "ONNX_FORMAT", "SCHEMA", "config_from_layers", "main", "run_demo", "run_eval",
           "run_export", "run_predict"]
