"""The detection task behind the `dinoseg` command: train, eval, predict, demo, check-data."""

import dataclasses
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ...data import DatasetError
from ...data.detection_check import check_detection_dataset, format_detection_report
from ...engine import distributed, reporting
from ...engine.checkpoint import LAST, read_head_weights
from ...engine.config import ConfigError, Precision
from ...engine.export import DEFAULT_OPSET, check_output_path
from ...engine.files import write_atomically
from ...engine.predict import list_images, predict_images, save_sample_images
from ...engine.rundir import eval_dir, prepare_output_dir
from ...engine.training import evaluation_loader
from ...models.precision import weights_autocast
from .config import DetectionConfig, config_from_layers
from .eval import METRICS_FILENAME, evaluate_detector, format_results, write_results
from .export import FORMAT, deployment_metadata, export_onnx
from .metrics import CocoEvaluator, to_coco_results
from .models.released import (
    COCO_CATEGORY_NAMES,
    HUB_DETECTORS,
    DetectionWeights,
    head_location,
    released_head_config,
)
from .setup import (
    build_dataset,
    build_detector_with_head,
    build_eval_transforms,
    build_postprocess,
    build_val_dataset,
    check_classes,
    check_image_sizes,
    head_num_classes,
)
from .train import train_detection
from .util.misc import collate_fn
from .visualization import category_colours, draw_detections

logger = logging.getLogger("dinoseg")

NAME = "detection"
SCHEMA = DetectionConfig
DEMO_CONFIG = "demo_detection.yaml"
ONNX_FORMAT = FORMAT  # the metadata `format` of the files `dinoseg export` writes (`predict --onnx` picks the task by it)

def _use_released(cfg: DictConfig, name: str) -> str:
    """Set the config's backbone and head to the released detector `name`; return its head file (hub cache)."""
    backbone = HUB_DETECTORS[name]
    head = released_head_config(backbone_name=backbone)
    OmegaConf.update(cfg, "model.dino_hub", backbone, merge=False)
    for key, value in dataclasses.asdict(head).items():
        OmegaConf.update(cfg, f"decoder_head.{key}", value, merge=False)
    return head_location(backbone, DetectionWeights.COCO2017)


def resolve_head(cfg: DictConfig) -> tuple[dict, str]:
    """(the head's weights, where they come from) of `cfg.head`: a checkpoint, a released head file, or a released
    detector's name (which also sets the backbone and head settings in `cfg`). Read before any backbone is built."""
    head = cfg.head
    if not head:
        raise ConfigError(f"head: a head checkpoint is required (head=PATH, or head={next(iter(HUB_DETECTORS))})")
    if head in HUB_DETECTORS:
        head = _use_released(cfg, head)
    return read_head_weights(head, task=NAME), str(head)


def run_eval(cfg: DictConfig):
    """`datasets.val` through the detector with `head=`, COCO box AP by pycocotools (sharded over processes):
    `results-detection.csv` / `.json` and `detections.json` in `eval_dir`."""
    device = distributed.setup(cfg.device)
    weights, source = resolve_head(cfg)
    num_classes = cfg.decoder_head.num_classes or head_num_classes(weights, source)
    dataset = build_val_dataset(cfg)
    check_classes(dataset, num_classes, "val", f"the head {source}")
    evaluator = CocoEvaluator(dataset) if distributed.is_main_process() else None
    model = build_detector_with_head(cfg, weights, source).to(device).eval()
    check_image_sizes(model, {"transforms.eval.size": (cfg.transforms.eval.size, cfg.decoder_head.num_queries_one2one)})
    loader = evaluation_loader(dataset, num_workers=min(cfg.train.num_workers, 2), seed=cfg.seed,
                               max_samples=cfg.eval.max_val_samples, collate_fn=collate_fn)
    out = eval_dir(cfg.output_dir, cfg.head)
    if distributed.is_main_process():  # everything is checked: now the outputs
        prepare_output_dir(out)
    distributed.barrier()
    metrics, detections = evaluate_detector(model, loader, build_postprocess(cfg), evaluator, device,
                                            label_to_category_id=dataset.label_to_category_id,
                                            autocast_dtype=Precision(cfg.precision).dtype)
    if distributed.is_main_process():
        write_results(metrics, detections, out)
        print(format_results(metrics))
        print(f"results: {out / METRICS_FILENAME}")
    return metrics


@torch.no_grad()
def run_predict(cfg: DictConfig | None, inputs: list[str], output: str, model=None, *, onnx: str | None = None) -> list[Path]:
    """Detections of images: `<name>_boxes.png` (the image with labelled boxes and scores) and `<name>.json` (boxes
    XYXY in the image's pixels, category ids and names, scores), for the detections scoring at least
    `eval.score_threshold`. An unreadable image is reported and skipped; the others are still processed, then the
    command fails naming every image it skipped. `onnx`: an exported detector run by onnxruntime on the CPU, with
    the settings and categories in its metadata (then no `cfg`)."""
    images = list_images(inputs, Path(output))
    if onnx:
        from .onnx_runtime import OnnxDetector

        device, dtype = torch.device("cpu"), torch.float32
        model = OnnxDetector(onnx)
        transform, postprocess = model.eval_transforms(), model.postprocess()
        threshold = model.metadata["score_threshold"]
        label_to_category, names, colours = model.categories()
    else:
        device, dtype = distributed.setup(cfg.device), Precision(cfg.precision).dtype
        if model is None:
            model = load_detector(cfg, device)
        transform, postprocess, threshold = build_eval_transforms(cfg), build_postprocess(cfg), cfg.eval.score_threshold
        label_to_category, names, colours = categories(cfg, model.class_embed[0].out_features)

    def detect(raw: torch.Tensor, name: Path) -> list[Path]:
        height, width = raw.shape[-2:]
        image, target = transform(raw, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})
        x = image[None].to(device)
        with weights_autocast(model, device.type, dtype):
            outputs = model(x)
        outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
        found = postprocess(outputs, target_sizes=target["size"][None].to(device))
        image_info = {"image_id": 0, "size": target["size"], "orig_size": torch.tensor([height, width])}
        detections = [{"category_id": r["category_id"], "category_name": names.get(r["category_id"], str(r["category_id"])),
                       "score": r["score"], "box": [r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2],
                                                    r["bbox"][1] + r["bbox"][3]]}
                      for r in to_coco_results(found, [image_info], label_to_category) if r["score"] >= threshold]
        targets = [name.parent / f"{name.name}_boxes.png", name.parent / f"{name.name}.json"]
        draw_detections(raw, detections, colours).save(targets[0])
        record = {"width": int(width), "height": int(height), "box_format": "XYXY, pixels of the image",
                  "score_threshold": threshold, "detections": detections}
        write_atomically(targets[1], lambda f: f.write(json.dumps(record, indent=1).encode()))
        return targets

    return predict_images(images, output, detect)


def load_detector(cfg: DictConfig, device: torch.device):
    """The configured detector with the trained head `cfg.head` (`resolve_head`), in eval mode."""
    weights, source = resolve_head(cfg)
    return build_detector_with_head(cfg, weights, source).to(device).eval()


def categories(cfg: DictConfig, num_classes: int) -> tuple[dict | None, dict[int, str], dict[int, tuple]]:
    """(label -> category id, category id -> name, category id -> colour) of the configured validation set when it
    is on this machine; otherwise labels are taken as category ids, named by COCO's names for a 91-class head and
    by their number for any other."""
    try:
        dataset = build_dataset(cfg, "val")
    except (DatasetError, FileNotFoundError, ConfigError):
        dataset = None
    if dataset is not None and dataset.num_classes == num_classes:
        names = dict(dataset.category_names)
        palette = getattr(dataset, "palette", None) or category_colours(len(names))
        return dict(dataset.label_to_category_id), names, dict(zip(dataset.category_ids, palette))
    names = dict(COCO_CATEGORY_NAMES) if num_classes == 91 else {k: str(k) for k in range(num_classes)}
    return None, names, dict(zip(sorted(names), category_colours(len(names))))


def run_export(cfg: DictConfig, output: str, image_size=None, opset: int = DEFAULT_OPSET) -> Path:
    """`dinoseg export`: the configured detector with its trained head (`head=`) as one ONNX file of a fixed input
    size, the canvas images are padded onto (`--size`; default: the largest side the eval transform gives,
    `transforms.eval.max_size` or else `transforms.eval.size`, square), with the preprocessing, `decoder_head.topk`,
    `eval.score_threshold` and the validation set's categories in its metadata."""
    output = check_output_path(output)  # before minutes of loading a large backbone
    model = load_detector(cfg, torch.device("cpu"))
    num_classes = model.class_embed[0].out_features
    label_to_category, names, colours = categories(cfg, num_classes)
    ids = [(label_to_category or {}).get(k, None if label_to_category else k) for k in range(num_classes)]
    t = cfg.transforms
    if image_size is None:
        patch = model.backbone.strides[0]
        side = -(-(t.eval.max_size or t.eval.size) // patch) * patch
        image_size = (side, side)
    check_image_sizes(model, {"--size": (min(image_size), cfg.decoder_head.num_queries_one2one)})
    metadata = deployment_metadata(
        mean=tuple(t.mean), std=tuple(t.std), size=t.eval.size, max_size=t.eval.max_size, topk=cfg.decoder_head.topk,
        score_threshold=cfg.eval.score_threshold,
        category_ids=ids, category_names=[None if c is None else names.get(c, str(c)) for c in ids],
        colours=[list(colours.get(c, (200, 200, 200))) for c in ids])
    path = export_onnx(model, output, image_size=image_size, opset=opset, metadata=metadata)
    print(f"wrote {path}")
    return path


def run_demo(cfg: DictConfig) -> dict:
    """Train on the synthetic set, print the validation's per-category table and COCO numbers, save the curves and
    the predictions of a few validation images."""
    results = train_detection(cfg)
    out = Path(cfg.output_dir)
    if not distributed.is_main_process():
        return results
    metrics = results["metrics"]
    print(format_results(metrics))
    curves = reporting.plot_history(out, {"AP": (0, 1), "AP50": (0, 1)})
    cfg.head = str(out / LAST)
    dataset = build_dataset(cfg, "val")
    sample_dir = save_sample_images(dataset, out / "demo_inputs")
    run_predict(cfg, [str(sample_dir)], str(out / "predictions"))
    print(f"AP50 {metrics.stats['AP50']:.3f}, AP {metrics.stats['AP']:.3f} on {metrics.num_images} validation images; "
          f"run directory: {out}")
    print(f"curves: {curves}; predictions: {out / 'predictions'}")
    return results


def run_check_data(cfg: DictConfig, split: str) -> int:
    """Walk one split once; print every problem by file and the per-category box counts. Exit status 1 on problems."""
    dataset = build_dataset(cfg, split, strict=False)
    report = check_detection_dataset(dataset, progress=True)
    print(format_detection_report(report))
    return 0 if report.ok else 1


def main(command: str, cfg: DictConfig, args) -> int:
    """Run one `dinoseg` subcommand on a loaded detection config."""
    if command == "train":
        train_detection(cfg)
    elif command == "eval":
        run_eval(cfg)
    elif command == "predict":
        run_predict(cfg, args.input, args.output, onnx=getattr(args, "onnx", None))
    elif command == "demo":
        run_demo(cfg)
    elif command == "check-data":
        return run_check_data(cfg, args.split)
    elif command == "export":
        run_export(cfg, args.output, args.size, args.opset)
    else:  # a command the parser knows and this task does not: never a silent success
        raise ConfigError(f"dinoseg {command}: the detection task has no such command")
    return 0


__all__ = ["DEMO_CONFIG", "NAME", "ONNX_FORMAT", "SCHEMA", "config_from_layers", "main", "run_demo", "run_eval", "run_export",
           "run_predict"]
