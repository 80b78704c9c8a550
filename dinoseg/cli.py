"""`dinoseg` command line: train / eval / predict / export / demo / check-data.

Every subcommand takes YAML config files and `key=value` overrides (OmegaConf dotlist), e.g.
    dinoseg train configs/ade20k_linear.yaml model.pretrained_weights=/w/vitl16.pth datasets.root=/data/ade
"""

import argparse
import logging
import sys

from omegaconf import OmegaConf

EXIT_ERROR = 2


def _split(items: list[str]) -> tuple[list[str], list[str]]:
    yamls = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    # `head=PATH` is the short form of `load_from=PATH`.
    overrides = [("load_from=" + o[5:]) if o.startswith("head=") else o for o in overrides]
    return yamls, overrides


def _config(items: list[str], default_yaml: str | None = None, require: tuple[str, ...] = ("",)):
    from .eval.segmentation.config import load_config

    yamls, overrides = _split(items)
    if not yamls and default_yaml:
        yamls = [default_yaml]
    return load_config(yamls, overrides, require=require)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dinoseg", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train a segmentation head"), ("eval", "evaluate a trained head (head=PATH)"),
                       ("demo", "train + evaluate on the synthetic dataset (configs/demo.yaml)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", nargs="*", help="YAML files and key=value overrides")
    p = sub.add_parser("predict", help="segment images: colour masks and overlays")
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides (head=PATH required)")
    p.add_argument("--input", "-i", nargs="+", required=True, help="image files or folders")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--onnx", metavar="FILE", help="run this exported segmentor (no config: settings from the file)")
    p = sub.add_parser("export", help="export a trained segmentor (head=PATH) to one ONNX file")
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides (head=PATH required)")
    p.add_argument("--output", "-o", required=True, help="the .onnx file to write")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), help="fixed input size (default: dynamic)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18, the lowest torch exports)")
    p = sub.add_parser("check-data", help="walk a dataset once and report problems + class histogram")
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides")
    p.add_argument("--split", choices=["train", "val"], default="train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from .data.io import DatasetError
    from .eval.segmentation.config import ConfigError
    from .eval.segmentation.export import ExportError
    from .eval.segmentation.train import TrainingError
    from .hub.checkpoint import CheckpointError

    try:
        if args.command == "demo":
            from .eval.segmentation.run import run_demo

            run_demo(_config(args.config, default_yaml="demo.yaml"))
        elif args.command == "train":
            from .eval.segmentation.run import train_segmentation

            cfg = _config(args.config)
            logging.getLogger("dinoseg").info("config:\n%s", OmegaConf.to_yaml(cfg))
            train_segmentation(cfg)
        elif args.command == "eval":
            from .eval.segmentation.eval import format_metrics_table
            from .eval.segmentation.run import run_eval

            results = run_eval(_config(args.config))
            from . import distributed

            if distributed.is_main_process():
                print(format_metrics_table(results))
        elif args.command == "predict":
            from .eval.segmentation.run import run_predict

            if args.onnx and args.config:
                raise ConfigError(f"predict --onnx takes its settings from {args.onnx}; drop {' '.join(args.config)}")
            cfg = None if args.onnx else _config(args.config)
            written = run_predict(cfg, args.input, args.output, onnx=args.onnx)
            print(f"wrote {len(written)} files to {args.output}")
        elif args.command == "export":
            from .eval.segmentation.export import run_export

            print(f"wrote {run_export(_config(args.config), args.output, args.size, args.opset)}")
        elif args.command == "check-data":
            from .data import make_dataset
            from .data.check import check_dataset, format_report
            from .eval.segmentation.setup import dataset_descriptor

            cfg = _config(args.config, require=("datasets.",))  # weights are not needed to check data
            descriptor = dataset_descriptor(cfg.datasets[args.split], cfg.datasets.root)
            report = check_dataset(make_dataset(descriptor, strict=False), progress=True)
            print(format_report(report))
            return 0 if not report.problems else 1
    except (ConfigError, CheckpointError, DatasetError, TrainingError, ExportError, FileNotFoundError) as e:
        print(f"dinoseg: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        from . import distributed

        if distributed.is_enabled():
            distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
