"""Start-up time of the command line and of `import dinoseg`, against `python -c "import torch"`, in one run.

    python benchmarks/startup.py [--runs 11]

Every measurement is a fresh `python` process started from here, timed until its first output (a byte on stdout or
stderr; the process is then killed): what a user waits for, without the interpreter's shutdown (torch's takes a
tenth of a second or more). Each round runs every case once, in the same order, so a change of the machine's load
touches all of them alike. Printed per case: the median over the rounds in seconds, its ratio to torch's import,
what it takes beyond torch's import, and the fastest run (on a loaded machine the least disturbed one).

Cases:
- `import torch`: the baseline (`python -c "import torch; print()"`).
- `import torch, torchvision`: what the commands that transform images pay (torchvision's import pulls in
  torch._dynamo).
- `dinoseg --help`, `dinoseg train --help`, a misspelt command: until argparse prints (target <= 0.5 s: no torch).
- `import dinoseg` (`python -c "import dinoseg; print()"`).
- `train demo.yaml`, config checked: until the command has read, translated and checked its config against the
  task's schema (and imported the task's code), i.e. when `cli.main` hands it to the task's `main`, where this
  process prints a line and stops (`cli.load` wrapped). Target: within about 1 s of torch's import.
- `train demo.yaml no_such_key=1`: until the one-line error.
- `check-data demo.yaml`: until its first output (the progress bar of the dataset walk: the dataset is built).
- `train demo.yaml`, first output: until the first line the run prints (the resolved config, logged once the data,
  the transforms and the model are built; torchvision is imported by then).
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs the command line as `python -m dinoseg.cli` does, but stops when the task would start its work.
CONFIG_CHECKED = """
import os, sys
from dinoseg import cli
load = cli.load
def stop_when_loaded(items, command):
    load(items, command)
    print("config checked", flush=True)
    os._exit(0)
cli.load = stop_when_loaded
sys.exit(cli.main(sys.argv[1:]))
"""


def until_first_output(argv: list[str], env: dict) -> float:
    """Seconds until the process writes its first byte (stdout or stderr), then the process is killed."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    proc.kill()
    proc.wait()
    proc.stdout.close()
    if not first:
        raise RuntimeError(f"{' '.join(argv)} printed nothing (exit {proc.returncode})")
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=11, help="rounds (fresh processes per case)")
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    py = sys.executable
    cli = [py, "-m", "dinoseg.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(10**6))
        cases = {
            "import torch": lambda: until_first_output([py, "-c", "import torch; print()"], env),
            "import torch, torchvision (for reference)": lambda: until_first_output(
                [py, "-c", "import torch, torchvision; print()"], env),
            "dinoseg --help": lambda: until_first_output(cli + ["--help"], env),
            "dinoseg train --help": lambda: until_first_output(cli + ["train", "--help"], env),
            "dinoseg trian demo.yaml (misspelt command)": lambda: until_first_output(cli + ["trian", "demo.yaml"], env),
            "import dinoseg": lambda: until_first_output([py, "-c", "import dinoseg; print()"], env),
            "train demo.yaml: config checked": lambda: until_first_output(
                [py, "-c", CONFIG_CHECKED, "train", "demo.yaml"], env),
            "train demo.yaml no_such_key=1 (config error)": lambda: until_first_output(
                cli + ["train", "demo.yaml", "no_such_key=1"], env),
            "check-data demo.yaml: first output": lambda: until_first_output(cli + ["check-data", "demo.yaml"], env),
            "train demo.yaml: first output": lambda: until_first_output(
                cli + ["train", "demo.yaml", f"output_dir={tmp}/run{next(runs)}"], env),
        }
        load_before = os.getloadavg()
        times = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, case in cases.items():
                times[name].append(case())
        load_after = os.getloadavg()

    import torch  # for the versions printed only, after the timings

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Python "
          f"{platform.python_version()}, torch {torch.__version__}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after; {args.runs} runs per case, medians")
    torch_s = statistics.median(times["import torch"])
    print(f"{'case':48s} {'median s':>9s} {'x torch':>8s} {'- torch':>8s} {'min s':>7s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:48s} {median:9.2f} {median / torch_s:8.2f} {median - torch_s:+8.2f} {min(values):7.2f}")


if __name__ == "__main__":
    main()
