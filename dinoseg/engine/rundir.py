"""Run directories: one training run owns its output directory, and a failed or mistaken command leaves an existing
run byte-identical.

A training run first checks the directory and everything else it needs, writing nothing; it then takes an OS lock
on the directory (released by the kernel when the process ends, however it ends: there is never a stale lock file)
and only then writes its config, metrics and checkpoints. Files are written to a temporary name, flushed, fsynced
and renamed, and the directory is fsynced, so a crash or a full disk leaves the previous version in place.
"""

import errno
import fcntl
import os
import shutil
import weakref
from pathlib import Path

from .checkpoint import BEST, LAST, peek_iteration
from .config import ConfigError
from .files import write_atomically


class RunDirError(ConfigError):
    """An output directory that a command may not use as asked; the message names it and what to do."""


METRICS_LOG = "metrics.jsonl"


class RunDirectory:
    """The output directory of a training run.

    `files` are the names a run writes there (config, checkpoints, logs, results, plots); `overwrite` removes
    exactly those, nothing else the user keeps in the directory.
    """

    def __init__(self, path: str | Path, config_filename: str, files: tuple[str, ...] = ()):
        self.path = Path(path)
        self.config_path = self.path / config_filename
        self.files = (config_filename, LAST, BEST, METRICS_LOG, *files)
        self._lock_fd: int | None = None

    def existing_run(self) -> list[str]:
        """The run files already in the directory."""
        return [name for name in self.files if (self.path / name).exists()]

    def check(self, *, resume: bool, overwrite: bool, lock: bool = True) -> Path | None:
        """Decide, writing nothing, whether a training run may use the directory; return the checkpoint to resume
        from (None for a fresh run). With `lock` (the process that writes), an existing directory is locked at
        once, so a second process is refused here."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output_dir={str(self.path)!r} is a file, not a directory")
        if lock and self.path.exists():
            self.lock()
        last = self.path / LAST
        if resume:
            if overwrite:
                raise RunDirError("train.resume=true and overwrite_output_dir=true contradict each other; choose one")
            if not last.exists():
                raise RunDirError(f"train.resume=true but there is no checkpoint to resume from: {last} not found")
            return last
        found = self.existing_run()
        if found and not overwrite:
            what = f"{LAST} at iteration {peek_iteration(last)}" if last.exists() else ", ".join(found)
            raise RunDirError(
                f"output_dir={str(self.path)!r} already holds a run ({what}); resume it with train.resume=true, "
                f"replace it with overwrite_output_dir=true, or choose another output_dir"
            )
        return None

    def lock(self) -> None:
        """An exclusive lock on the directory itself (no lock file); refused at once if another process holds it."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunDirError(f"output_dir={str(self.path)!r} is in use by another dinoseg process") from None
            raise
        self._lock_fd = fd
        # The kernel drops the lock when the process ends; within a process, when this object goes away.
        self._finalizer = weakref.finalize(self, os.close, fd)

    def start(self, config_text: str, *, overwrite: bool) -> Path:
        """The run really starts: create and lock the directory, remove the previous run's files when
        overwriting, and write the resolved config (what this run uses)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"output_dir={str(self.path)!r} cannot be created ({e.strerror})") from None
        self.lock()
        if not os.access(self.path, os.W_OK):
            raise RunDirError(f"output_dir={str(self.path)!r} is not writable")
        if overwrite:
            for name in self.existing_run():
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        write_atomically(self.config_path, lambda f: f.write(config_text.encode()))
        return self.path

    def release(self) -> None:
        if self._lock_fd is not None:
            self._finalizer()
            self._lock_fd = None


def prepare_output_dir(path: str | Path) -> Path:
    """An output folder for results or predictions (not a training run), created when missing."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{out}: cannot create the output folder ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise RunDirError(f"{out}: the output folder is not writable")
    return out
