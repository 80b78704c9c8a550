"""Run directories: one training run owns its output directory, a failed or mistaken command leaves an existing
run byte-identical, and no run is ever lost.

A training run first checks the directory and everything else it needs, writing nothing; it then takes an OS lock
on the directory (released by the kernel when the process ends, however it ends: there is never a stale lock file)
and only then writes its config, metrics and checkpoints. Files are written to a temporary name, flushed, fsynced
and renamed, and the directory is fsynced, so a crash or a full disk leaves the previous version in place.

A new run is not committed until its first `checkpoint_last.pth`. Until then `.dinoseg-replaced/` marks it, holding
the files of the run it replaces (`overwrite_output_dir`), moved aside, not deleted: the first checkpoint deletes them;
a run that stops before it (an error, Ctrl-C) is undone: its files removed, the replaced ones put back. After a kill
or a power cut, the next `train` into the directory does the same from what it finds (`recover`). Each step is a
rename, and the order of the steps makes every intermediate state one that `recover` finishes correctly.
"""

import errno
import fcntl
import logging
import os
import shutil
import weakref
from pathlib import Path

from .checkpoint import BEST, LAST, peek_iteration
from .config import ConfigError, Resume
from .files import fsync_directory, write_atomically

logger = logging.getLogger("dinoseg")


class RunDirError(ConfigError):
    """An output directory that a command may not use as asked; the message names it and what to do."""


METRICS_LOG = "metrics.jsonl"
# The files of the run being replaced, kept until the new run's first checkpoint; also the mark of a new run without one.
REPLACED = ".dinoseg-replaced"
# Files on their way back (to be moved into the directory, over any file of the same name): files being moved aside
# for a new run, or those of a replaced run being put back.
RESTORING = ".dinoseg-replaced.restoring"


class RunDirectory:
    """The output directory of a training run.

    `files` are the names a run writes there (config, checkpoints, logs, results, plots); `overwrite_output_dir`
    replaces exactly those, nothing else the user keeps in the directory.
    """

    def __init__(self, path: str | Path, config_filename: str, files: tuple[str, ...] = ()):
        self.path = Path(path)
        self.config_path = self.path / config_filename
        self.files = (config_filename, LAST, BEST, METRICS_LOG, *files)
        self._lock_fd: int | None = None
        self._created = False  # whether `start` created the directory (an undone run removes it again)

    def existing_run(self) -> list[str]:
        """The run files already in the directory."""
        return [name for name in self.files if (self.path / name).exists()]

    def check(self, *, resume: Resume, overwrite: bool, lock: bool = True) -> Path | None:
        """Decide, writing nothing, whether a training run may use the directory; return the checkpoint to resume
        from (None for a new run). With `lock` (the process that writes), an existing directory is locked at once,
        so a second process is refused here, and a start that a kill interrupted is finished or undone first."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output_dir={str(self.path)!r} is a file, not a directory")
        if lock and self.path.exists():
            self.lock()
            self.recover()
        last = self.path / LAST
        if resume != Resume.FALSE and overwrite:
            raise RunDirError(f"train.resume={resume.value} and overwrite_output_dir=true contradict each other; "
                              f"choose one")
        if resume == Resume.TRUE and not last.exists():
            raise RunDirError(f"train.resume=true but there is no checkpoint to resume from: {last} not found")
        if resume != Resume.FALSE and last.exists():
            return last
        found = self.existing_run()
        if found and not overwrite:
            if resume == Resume.AUTO:
                raise RunDirError(f"output_dir={str(self.path)!r} holds files of a run ({', '.join(found)}) but no {LAST} "
                                  f"to continue from; replace them with overwrite_output_dir=true (not with "
                                  f"train.resume=auto), or choose another output_dir")
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

    def start(self, config_text: str, *, new_run: bool) -> Path:
        """The run really starts: create and lock the directory and write the resolved config (what this run uses).
        A new run first moves the files of a run it replaces aside (`check` allowed it: overwrite_output_dir) into
        `.dinoseg-replaced/`, which marks it until its first checkpoint (`commit`)."""
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"output_dir={str(self.path)!r} cannot be created ({e.strerror})") from None
        self.lock()
        if not os.access(self.path, os.W_OK):
            raise RunDirError(f"output_dir={str(self.path)!r} is not writable")
        self._created = created
        if new_run:
            aside = self.path / RESTORING  # until the rename below, a kill puts every file back
            aside.mkdir()
            for name in self.existing_run():
                os.replace(self.path / name, aside / name)
            fsync_directory(aside)
            os.replace(aside, self.path / REPLACED)
            fsync_directory(self.path)
        try:
            write_atomically(self.config_path, lambda f: f.write(config_text.encode()))
        except BaseException:
            self.undo()
            raise
        return self.path

    def commit(self) -> None:
        """The new run has written its first checkpoint: the run it replaced is deleted now (no-op otherwise)."""
        replaced = self.path / REPLACED
        if replaced.exists():
            shutil.rmtree(replaced)
            fsync_directory(self.path)

    def undo(self) -> None:
        """A new run stopped before its first checkpoint: remove its files and put back those of the run it replaced,
        so that the same command starts again (no-op for a committed or resumed run)."""
        replaced = self.path / REPLACED
        if not replaced.exists() or (self.path / LAST).exists():
            return
        removed = [name for name in self.existing_run() if not (replaced / name).exists()]
        for name in removed:  # files with a counterpart in `replaced` are replaced by it below
            _remove(self.path / name)
        os.replace(replaced, self.path / RESTORING)
        fsync_directory(self.path)
        restored = self._restore()
        if self._created and not any(self.path.iterdir()):
            self.path.rmdir()  # the directory this run created goes too
        logger.info("%s: the run stopped before its first checkpoint; its files are removed%s", self.path,
                    f" and the run it replaced is back ({', '.join(restored)})" if restored else "")

    def recover(self) -> None:
        """Finish what a killed process left half done (the lock is held): files on their way back are moved back;
        a new run without a checkpoint is undone; a new run with one deletes the run it replaced."""
        if (self.path / RESTORING).exists():
            restored = self._restore()
            logger.warning("%s: put back the files of the run that an interrupted start was replacing (%s)", self.path,
                           ", ".join(restored) or "none")
        if (self.path / REPLACED).exists():
            if (self.path / LAST).exists():
                self.commit()
                logger.warning("%s: deleted the run replaced by the run here, which had written its first checkpoint "
                               "when it was interrupted", self.path)
            else:
                self.undo()

    def _restore(self) -> list[str]:
        """Move every file of `.dinoseg-replaced.restoring/` back, over any file of the same name (a file of the run
        being undone)."""
        restoring = self.path / RESTORING
        names = sorted(p.name for p in restoring.iterdir())
        for name in names:
            if (self.path / name).exists() or (self.path / name).is_symlink():
                _remove(self.path / name)
            os.replace(restoring / name, self.path / name)
        fsync_directory(self.path)
        restoring.rmdir()
        fsync_directory(self.path)
        return names

    def release(self) -> None:
        if self._lock_fd is not None:
            self._finalizer()
            self._lock_fd = None


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def eval_dir(output_dir: str | Path, head: str | Path) -> Path:
    """Where `dinoseg eval` writes: `<output_dir>/eval/<head file stem>`, so that evaluating a run's checkpoints
    never replaces the training run's own results."""
    return Path(output_dir) / "eval" / Path(str(head)).stem


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
