"""The dinoseg command line, paused after a given training step until the test lets it go on, so that a test acts
(a signal, a kill, another command) at a known point of a run instead of racing it:

    python tests/_paused_run.py FOLDER STEP train ...        (or as torchrun's script)

After step STEP, every process writes its pid to FOLDER/paused.<rank> and waits until FOLDER/go exists; signals reach
it while it waits.
"""

import os
import signal
import sys
import time
from pathlib import Path

from dinoseg import cli
from dinoseg.engine import reporting


def main() -> int:
    folder, step, args = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    update = reporting.LossLog.update

    def update_then_pause(self, done, loss, lr):
        update(self, done, loss, lr)
        if done == step:
            rank = os.environ.get("RANK", "0")
            (folder / f".paused.{rank}").write_text(str(os.getpid()))
            os.replace(folder / f".paused.{rank}", folder / f"paused.{rank}")  # whole, or not there
            while not (folder / "go").exists():
                time.sleep(0.01)

    reporting.LossLog.update = update_then_pause
    # Ctrl-C as from a terminal, even when the tests run in the background: a shell starts background jobs with
    # SIGINT ignored, and Python then leaves it ignored (the run would never see the test's SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
