"""Running a trained model over image files (`dinoseg predict`), the same way for every task.

Inputs are files or folders (searched recursively); each image's results are written in the output folder at the
image's path below the inputs' common folder, so images of the same name in different folders keep their own
results. A manifest in the output folder lists what earlier predictions wrote there, so that they are never taken
as inputs (`-o` may equal `-i`). An unreadable image is skipped, the others are processed, and the command then
fails naming every image it skipped.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from ..data.io import IMAGE_EXTENSIONS, DatasetError, load_image
from . import reporting
from .config import ConfigError
from .files import write_atomically
from .rundir import prepare_output_dir

PREDICT_MANIFEST = ".dinoseg_predict.json"  # the files predict wrote into an output folder


def written_before(out: Path) -> set[Path]:
    """The files earlier predictions wrote into `out` (resolved paths)."""
    manifest = out / PREDICT_MANIFEST
    if not manifest.exists():
        return set()
    try:
        return {(out / name).resolve() for name in json.loads(manifest.read_text())}
    except (OSError, ValueError, TypeError):
        raise ConfigError(f"{manifest}: unreadable list of earlier predictions; delete it or choose another -o") from None


def list_images(inputs: list[str], out: Path) -> list[tuple[Path, Path]]:
    """(image, output name without suffix) for every image in `inputs` (files, or folders searched recursively,
    hidden entries skipped); files an earlier prediction wrote into `out` are not inputs."""
    own = written_before(out)
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file()
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
            paths += [q for q in found if q.resolve() not in own]
        elif p.is_file():
            paths.append(p)
        else:
            raise ConfigError(f"{p}: input image or folder not found")
    paths = list(dict.fromkeys(q.resolve() for q in paths))  # an image named twice is processed once
    if not paths:
        raise ConfigError(f"no images found in {inputs}")
    common = Path(os.path.commonpath([q.parent for q in paths]))
    return [(q, q.relative_to(common).with_suffix("")) for q in paths]


def predict_images(images: list[tuple[Path, Path]], output: str | Path,
                   predict_one: Callable[[torch.Tensor, Path], list[Path]]) -> list[Path]:
    """`predict_one(image uint8 [3, H, W], output path without suffix)` -> the files it wrote, for every image of
    `list_images`, with a progress bar; then the manifest. Unreadable images are skipped and named at the end."""
    out = prepare_output_dir(output)
    written, failed = [], []
    with reporting.progress(desc="predict", iterable=images) as bar:
        for path, name in bar:
            try:
                raw = load_image(str(path))  # any mode -> RGB
            except DatasetError as e:
                failed.append(str(e))
                continue
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            written += predict_one(raw, out / name)
    manifest = sorted({str(p.relative_to(out.resolve())) for p in written_before(out)} |
                      {str(p.relative_to(out)) for p in written})
    write_atomically(out / PREDICT_MANIFEST, lambda f: f.write(json.dumps(manifest, indent=0).encode()))
    print(f"wrote {len(written)} files for {len(images) - len(failed)} images to {output}")
    if failed:
        raise DatasetError(f"{len(failed)} of {len(images)} images could not be read and were skipped: "
                           + "; ".join(failed))
    return written


def save_sample_images(dataset, out: str | Path, count: int = 4) -> Path:
    """The first `count` images of `dataset` (its `load_image`, uint8 [3, H, W]) as `out/sample_<i>.png`, inputs for
    a demo's predictions; returns `out`."""
    out = Path(out)
    out.mkdir(exist_ok=True)
    for i in range(min(count, len(dataset))):
        Image.fromarray(dataset.load_image(i).permute(1, 2, 0).numpy()).save(out / f"sample_{i}.png")
    return out
