"""`dinoseg` command line: train / eval / predict / export / demo / check-data, for the task a config names.

Every subcommand takes YAML config files and `key=value` overrides (OmegaConf dotlist), e.g.
    dinoseg train ade20k_linear.yaml model.pretrained_weights=/w/vitl16.pth datasets.root=/data/ade
YAML files are paths or the names of the configs shipped with dinoseg. Configs of the official DINOv3 code
(config-ade20k-linear-training.yaml, config-nyu.yaml, ...) are recognised, their task told by their keys, and
translated key by key.
"""

import argparse
import logging
import re
import sys

from .eval import TASKS, task_runner

# torch, the tasks' code and the libraries they use are imported by the functions that need them, after the arguments
# are parsed: `dinoseg --help` and argument errors print at once (tests/test_startup.py).

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
_ERROR_HEAD = re.compile(r"^[A-Za-z_][\w.]*: ")  # "module.path.ErrorClass: " opening a traceback's last error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinoseg", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train a head"), ("eval", "evaluate a trained head (head=PATH)"),
                       ("demo", "train + evaluate on a synthetic dataset (default: demo.yaml)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", nargs="*", help="YAML files and key=value overrides")
    p = sub.add_parser("predict", help="run a trained head on images")
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides (head=PATH required)")
    p.add_argument("--input", "-i", nargs="+", required=True, help="image files or folders")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--onnx", metavar="FILE", help="run this exported model (no config: task and settings from the file)")
    p = sub.add_parser("export", help="export a trained model (head=PATH) to one ONNX file")
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides (head=PATH required)")
    p.add_argument("--output", "-o", required=True, help="the .onnx file to write")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), help="fixed input size (default: dynamic)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18, the lowest torch exports)")
    p = sub.add_parser("check-data", help="walk a dataset once and report problems and statistics")
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides")
    p.add_argument("--split", choices=["train", "val"], default="train")
    return parser


def onnx_runner(path: str):
    """The runner of the task that exported `path`, told by the file's metadata `format`."""
    from .engine.export import ExportError, decode_metadata, read_onnx_metadata, require_packages

    require_packages("onnxruntime", purpose="predict --onnx")
    props = read_onnx_metadata(path)
    fmt = decode_metadata(path, {"format": props["format"]})["format"] if "format" in props else None
    runners = {getattr(task_runner(name), "ONNX_FORMAT", None): task_runner(name) for name in TASKS}
    if fmt not in runners or fmt is None:
        older = [f for f in runners if f and _older_format(fmt, f)]
        if older:  # e.g. a detector exported before its graph took a padding mask
            raise ExportError(f"{path}: exported by an older dinoseg (metadata format {fmt!r}; this version runs "
                              f"{older[0]!r}): export it again")
        known = ", ".join(sorted(f for f in runners if f))
        raise ExportError(f"{path}: not a dinoseg export (metadata format is {fmt!r}; expected one of {known})")
    return runners[fmt]


def _older_format(fmt, current: str) -> bool:
    """Whether metadata format `fmt` ("name/N") is an earlier version of `current`."""
    if not isinstance(fmt, str) or fmt.count("/") != 1 or current.count("/") != 1:
        return False
    (name, version), (current_name, current_version) = fmt.split("/"), current.split("/")
    return name == current_name and version.isdigit() and int(version) < int(current_version)


def load(items: list[str], command: str):
    """(task runner, config) for the YAML files and overrides in `items`."""
    from .engine.config import ConfigError, layer_value, read_layers
    from .engine.official_config import official_task, translate_layers

    yamls = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    if command == "demo" and not yamls:
        yamls = [task_runner("segmentation").DEMO_CONFIG]
    layers = read_layers(yamls, overrides)
    if command == "train" and not any(len(layer) for layer in layers[:-1]) and not layer_value(layers, "datasets"):
        # Defaults alone (a synthetic dataset, 40,000 iterations) are never a run anyone meant.
        what = f"{', '.join(yamls)} sets nothing" if yamls else "no config file given"
        raise ConfigError(f"train: {what}; pass a config, e.g. `dinoseg train demo.yaml` (a small demo run), or "
                          f"`dinoseg train ade20k_linear.yaml model.pretrained_weights=... datasets.root=...`")
    task = layer_value(layers, "task")
    if task is not None and str(task) not in TASKS:
        raise ConfigError(f"task={task!r}: expected one of {sorted(TASKS)}")
    # A config of the official DINOv3 code has no `task`: its keys tell (`losses` is depth's).
    schemas = {name: getattr(task_runner(name), "OFFICIAL", None) for name in TASKS}
    task = str(official_task(layers, schemas, None if task is None else str(task)) or "segmentation")
    runner = task_runner(task)
    layers = translate_layers(layers, getattr(runner, "OFFICIAL", None))  # a config in the official schema
    require = ("datasets.",) if command == "check-data" else ("",)  # weights are not needed to check data
    return runner, runner.config_from_layers(layers, require)


class _AboveBars(logging.StreamHandler):
    """Log lines printed above the progress bars instead of onto them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def one_line(error: BaseException) -> str:
    """The message of `error` on one line. An error raised in a data-loader worker comes back wrapped in the
    worker's traceback, which ends with the original error as ``module.path.ErrorClass: message``: its message alone
    is kept, so that the line reads as when the error is raised in the main process."""
    text = str(error).strip() or type(error).__name__
    if "Original Traceback" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        # The original error starts on the last unindented line that begins with a (dotted) class name.
        start = max((i for i, line in enumerate(lines) if _ERROR_HEAD.match(line)), default=len(lines) - 1)
        text = _ERROR_HEAD.sub("", "\n".join(lines[start:]), count=1)
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .data.io import DatasetError
    from .engine import distributed
    from .engine.config import ConfigError
    from .engine.export import ExportError
    from .engine.optim import TrainingError
    from .models.checkpoint import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=[_AboveBars()])
    try:
        if getattr(args, "onnx", None):  # an exported model carries its task and settings
            if args.config:
                raise ConfigError(f"predict --onnx takes its settings from {args.onnx}; drop {' '.join(args.config)}")
            return onnx_runner(args.onnx).main(args.command, None, args)
        runner, cfg = load(args.config, args.command)
        return runner.main(args.command, cfg, args)
    except (ConfigError, CheckpointError, DatasetError, TrainingError, ExportError, OSError) as e:
        print(f"dinoseg: error: {one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_ERROR)
    except KeyboardInterrupt:
        print("dinoseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
