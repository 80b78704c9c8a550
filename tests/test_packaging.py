"""A plain (non-editable) install carries the shipped configs: found by bare name from any directory."""

import os
import subprocess
import sys

from .engine_utils import REPO


def test_non_editable_install_finds_shipped_configs(tmp_path):
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(REPO)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    assert (site / "dinoseg" / "configs" / "demo.yaml").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    code = ("import sys, dinoseg; assert dinoseg.__file__.startswith(sys.argv[1]), dinoseg.__file__; "
            "from dinoseg.cli import main; sys.exit(main(['check-data', 'demo.yaml', '--split', 'val']))")
    run = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, timeout=300,
                         cwd=elsewhere, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "problems" in run.stdout.lower() or "samples" in run.stdout.lower(), run.stdout
