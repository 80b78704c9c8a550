"""Start-up time of the command line and of `import dinoseg`, against `python -c "import torch"`, in one run.

    python benchmarks/startup.py [--runs 7]

Every measurement is a fresh `python` process started from here; each round runs every case once (in the same
order), so a change of the machine's load touches all of them alike. Printed per case: the median over the rounds
in seconds, its ratio to torch's import, and what it takes beyond torch's import.

Cases:
- `import torch`: the baseline.
- `dinoseg --help`, `dinoseg train --help`, a misspelt command: until the process exits (target <= 0.5 s: no torch).
- `import dinoseg`: until the process exits.
- `train demo.yaml`, config checked: until the command has read, translated and checked its config against the
  task's schema (and imported the task's code), i.e. when `cli.main` hands it to the task's `main`; the process
  stops there (`cli.load` wrapped). Target: within about 1 s of torch's import.
- `train demo.yaml no_such_key=1`: until the one-line error is printed and the process exits.
- `check-data demo.yaml`: until its first output (the progress bar of the dataset walk: the dataset is built).
- `train demo.yaml`, first output: until the first line the run prints (the resolved config, logged once the data,
  the transforms and the model are built; torchvision is imported by then); the process is then killed.
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


def until_exit(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    return time.perf_counter() - start


def until_first_output(argv: list[str], env: dict) -> float:
    """Seconds until the process writes its first line (stdout or stderr; tqdm's bar ends with a carriage return),
    then the process is killed."""
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
    p.add_argument("--runs", type=int, default=7, help="rounds (fresh processes per case)")
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    py = sys.executable
    cli = [py, "-m", "dinoseg.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(10**6))
        cases = {
            "import torch": lambda: until_exit([py, "-c", "import torch"], env),
            "dinoseg --help": lambda: until_exit(cli + ["--help"], env),
            "dinoseg train --help": lambda: until_exit(cli + ["train", "--help"], env),
            "dinoseg trian demo.yaml (misspelt command)": lambda: until_exit(cli + ["trian", "demo.yaml"], env),
            "import dinoseg": lambda: until_exit([py, "-c", "import dinoseg"], env),
            "train demo.yaml: config checked": lambda: until_first_output(
                [py, "-c", CONFIG_CHECKED, "train", "demo.yaml"], env),
            "train demo.yaml no_such_key=1 (config error)": lambda: until_exit(
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
    print(f"{'case':48s} {'seconds':>8s} {'x torch':>8s} {'- torch':>8s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:48s} {median:8.2f} {median / torch_s:8.2f} {median - torch_s:+8.2f}")


if __name__ == "__main__":
    main()
