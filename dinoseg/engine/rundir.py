"""Run directories: where a run writes, and the rules that keep an existing run intact."""

from pathlib import Path

from .optim import TrainingError


def prepare_output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"output_dir={path!r} is not writable ({e.strerror})") from None
    return out
