"""Start-up (issue 20, point 7): which modules the command line and `import dinoseg` import, never how long they take
(`benchmarks/startup.py` times them). `dinoseg --help` and argument errors import no torch; `import dinoseg` imports
nothing heavy yet every public name resolves; a command loads and checks its config without torchvision, scipy,
matplotlib, onnx or pycocotools, which are imported where they are used."""

import importlib
import importlib.util
import json
import subprocess
import sys

import pytest

import dinoseg
import dinoseg.hub

from ._official_yaml import LINEAR
from .engine_utils import REPO, cli_env

# Slow to import, and needed by few commands (torchvision's import alone pulls in torch._dynamo).
HEAVY = ("torchvision", "torch._dynamo", "scipy", "matplotlib", "onnx", "onnxruntime", "pycocotools", "tensorboard")


def run_importing(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`python -X importtime *args` from the repository root: the finished process and the modules it imported."""
    run = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=REPO,
                         env=cli_env(), timeout=300)
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    return run, imported


def heavy(imported: set[str], names=HEAVY) -> list[str]:
    return sorted(name for name in names if name in imported)


@pytest.mark.parametrize("argv, exit_code", [
    (["--help"], 0),
    (["train", "--help"], 0),
    (["trian", "demo.yaml"], 2),  # no such command
    (["predict", "demo.yaml"], 2),  # --input and --output missing
    ([], 2),  # no command
])
def test_help_and_argument_errors_import_no_torch(argv, exit_code):
    run, imported = run_importing("-m", "dinoseg.cli", *argv)
    assert run.returncode == exit_code, run.stderr[-2000:]
    assert "usage: dinoseg" in run.stdout + run.stderr
    assert "dinoseg.eval" in imported  # the check itself works: the command line imported its task table
    assert not heavy(imported, ("torch", "numpy", "omegaconf") + HEAVY)


def test_import_dinoseg_imports_no_torch_and_every_name_resolves():
    run, imported = run_importing("-c", "import dinoseg; dinoseg.__all__; dir(dinoseg)")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "dinoseg" in imported and not heavy(imported, ("torch",) + HEAVY)
    # In this process: every public name resolves, is listed by dir() and comes with a star import.
    assert set(dinoseg.__all__) <= set(dir(dinoseg))
    for name in dinoseg.__all__:
        assert getattr(dinoseg, name) is not None, name
    namespace = {}
    exec("from dinoseg import *", namespace)
    assert set(dinoseg.__all__) <= set(namespace)
    assert dinoseg.hub is importlib.import_module("dinoseg.hub") and dinoseg.cli.main
    with pytest.raises(AttributeError, match="no_such_name"):
        dinoseg.no_such_name  # noqa: B018


def test_the_hub_lists_every_entry_point_of_its_modules():
    for module, names in dinoseg.hub._MODULES.items():
        assert sorted(names) == sorted(importlib.import_module(f"dinoseg.hub.{module}").__all__), module
    assert set(dinoseg.hub.__all__) <= set(dir(dinoseg.hub))
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")  # as torch.hub.load reads it
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    for name in dinoseg.hub.__all__:
        assert getattr(hubconf, name) is getattr(dinoseg.hub, name), name


def test_using_one_name_imports_only_what_it_needs():
    run, imported = run_importing("-c", "import dinoseg; dinoseg.dinov3_vits16; dinoseg.build_segmentation_decoder; "
                                        "dinoseg.dinov3_vitl16_chmv2; dinoseg.dinov3_vit7b16_de; dinoseg.make_dataset; "
                                        "dinoseg.SegmentationConfig; dinoseg.DepthConfig; dinoseg.DetectionHeadConfig")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "torch" in imported and not heavy(imported)


# Loads each config (argv[2]: a JSON list of argument lists) in one process; prints the heavy modules imported so far
# after each.
LOAD = f"""
import json, sys
from dinoseg import cli
for items in json.loads(sys.argv[2]):
    cli.load(items, sys.argv[1])
    print([name for name in {HEAVY!r} if name in sys.modules])
"""


def test_a_command_loads_and_checks_its_config_without_heavy_imports(tmp_path):
    official = tmp_path / "config-ade20k-linear-training.yaml"
    official.write_text(LINEAR)
    configs = [["demo.yaml"], ["demo_m2f.yaml"], ["demo_depth.yaml"], ["nyu_linear.yaml", "datasets.root=/nowhere"],
               ["demo_detection.yaml"], ["coco_vitl16_plain_detr.yaml", "datasets.root=/nowhere"],
               [str(official), "datasets.root=/nowhere"]]
    run = subprocess.run([sys.executable, "-c", LOAD, "check-data", json.dumps(configs)], capture_output=True, text=True,
                         cwd=REPO, env=cli_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert dict(zip(map(" ".join, configs), run.stdout.splitlines())) == {" ".join(c): "[]" for c in configs}


def test_a_config_error_imports_no_heavy_module():
    run, imported = run_importing("-m", "dinoseg.cli", "train", "demo.yaml", "no_such_key=1")
    assert run.returncode == 2 and "dinoseg: error:" in run.stderr and "no_such_key" in run.stderr, run.stderr[-2000:]
    assert not heavy(imported)


@pytest.mark.parametrize("config", ["demo.yaml", "demo_depth.yaml", "demo_detection.yaml"])
def test_check_data_runs_without_heavy_imports(config):
    run, imported = run_importing("-m", "dinoseg.cli", "check-data", config, "--split", "val")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "dinoseg.data.datasets" in imported and not heavy(imported)


def test_the_depth_config_checks_the_fixed_crops_the_transforms_take():
    from dinoseg.eval.depth.config import FIXED_CROPS
    from dinoseg.eval.depth.transforms import FixedCrop, _FixedCropType

    assert sorted(FIXED_CROPS) == sorted(t.value for t in _FixedCropType)
    for name in FIXED_CROPS:
        FixedCrop(name.lower())
