"""What check-data's walks share (segmentation's `check`, depth's `depth_check`): a fault by file, the faults a
dataset found while indexing, and reading one sample's image and target without stopping at a bad file."""

from __future__ import annotations

from dataclasses import dataclass

from .datasets.common import size_mismatch
from .io import DatasetError


@dataclass
class Problem:
    path: str  # the file at fault (or the sample name for generated data)
    fault: str


def report_lines(report, unit: str, max_problems: int) -> list[str]:
    """The opening every check-data report shares: how many `unit`s were checked, then the problems (at most
    `max_problems` listed) and the warnings, each by file."""
    lines = [f"Checked {report.num_checked}/{report.num_samples} {unit} of {report.dataset}: "
             f"{report.num_usable} without problems"]
    for title, items, when_none in (("problem(s)", report.problems, "No problems found."),
                                    ("warning(s)", report.warnings, None)):
        if items:
            lines.append(f"{len(items)} {title}:")
            lines += [f"  {p.path}: {p.fault}" for p in items[:max_problems]]
            if len(items) > max_problems:
                lines.append(f"  ... and {len(items) - max_problems} more")
        elif when_none:
            lines.append(when_none)
    return lines


def indexing_problems(dataset) -> list[Problem]:
    """The faults `dataset` (built with strict=False) found while indexing its files, or its empty split."""
    problems = [Problem(p, f) for p, f in getattr(dataset, "problems", [])]
    if len(dataset) == 0 and not problems:
        problems.append(Problem(str(getattr(dataset, "root", None)), "empty split: the dataset has no samples"))
    return problems


def sample_indices(count: int, progress: bool):
    """0 .. count - 1, behind a progress bar when asked."""
    if not progress:
        return range(count)
    from tqdm import tqdm

    return tqdm(range(count), desc="check-data", unit="img")


def read_pair(dataset, index: int, load_target, target_path: str | None, kind: str, file_kind: str,
              problems: list[Problem]):
    """(image, target) of sample `index` before transforms, each None when it cannot be read: an unreadable file
    and an image and target (`kind`: "mask", "depth"; its file: `file_kind`) of different sizes go to `problems`."""
    name = dataset.image_path(index) or dataset.sample_name(index)
    image = target = None
    try:
        image = dataset.load_image(index)
    except Exception as e:
        problems.append(_as_problem(e, name, "unreadable or corrupt image"))
    try:
        target = load_target(index)
    except Exception as e:
        problems.append(_as_problem(e, target_path or name, f"unreadable or corrupt {file_kind}"))
    if image is not None and target is not None and image.shape[-2:] != target.shape[-2:]:
        reason = size_mismatch(kind, name, tuple(image.shape[-2:]), tuple(target.shape[-2:]))
        problems.append(Problem(target_path or name, reason))
    return image, target


def _as_problem(error: Exception, path: str, what: str) -> Problem:
    if isinstance(error, DatasetError) and error.reason:
        return Problem(error.path or path, error.reason)
    return Problem(path, f"{what}: {type(error).__name__}: {error}")
