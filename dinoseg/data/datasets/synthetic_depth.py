"""Synthetic depth scenes generated on the fly (no files, no download), for demos and tests.

Each image is rendered by a pinhole camera 1.5 m above a floor that runs to a back wall (or, in a third of the
scenes, to max_depth, beyond which there is no depth, as in the sky), with a few boxes standing on the floor.
Depth is exact: the floor's depth falls as 1 / (row - horizon), walls and boxes are fronto-parallel. Surfaces
are warm-coloured and carry textures fixed in world coordinates (so they shrink with distance); the air adds a
blue fog: a surface at depth d keeps ``exp(-d / fog)`` of its colour and contrast and takes the rest from the
fog colour. Fog and texture scale make depth readable from local appearance, so that a linear probe on the
patch features of a frozen network, even one with random weights, learns it (tests/test_depth_datasets.py
measures it). Where there is no surface (the sky) depth is 0, like the holes of real sensors.

Depth is returned in millimetres (``depth_scale = 1000``), as NYU's PNGs, so the NYU recipe applies as is.
Sample ``i`` of a split depends only on ``(seed, split, i)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..io import DatasetError
from .common import GeneratedSamples
from .depth_base import DepthDataset

CAMERA_HEIGHT = 1.5  # metres
FOG_COLOR = np.array([60.0, 110.0, 210.0])


def _albedo(rng: np.random.Generator) -> np.ndarray:
    """A warm, moderately saturated surface colour (the fog is blue: hue tells distance)."""
    return rng.uniform(110, 230) * np.array([1.0, 0.85, 0.65]) * rng.uniform(0.85, 1.15, size=3)


def _pattern(u: np.ndarray, v: np.ndarray, kind: int, period: float) -> np.ndarray:
    """A texture in about [-1, 1] at world coordinates (u, v) in metres."""
    if kind == 0:  # checker
        return np.where((np.floor(u / period) + np.floor(v / period)) % 2 == 0, 1.0, -1.0)
    if kind == 1:  # stripes
        return np.sign(np.sin(2 * np.pi * u / period)) * 0.8
    return np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)  # blobs


class SyntheticDepth(GeneratedSamples, DepthDataset):
    """Deterministic synthetic RGB-D scenes (see the module docstring).

    Args:
        split: "train", "val", "test" (or any name: it only changes the random stream).
        num_samples: number of images in the split.
        image_size: side (int) or (height, width).
        seed: global seed; sample i of a split is a function of (seed, split, i) only.
        min_depth / max_depth: range of the scene depths in metres.
        max_objects: boxes per image (0 .. max_objects).
    """

    depth_scale = 1000.0
    eval_mask = "FULL"

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 64,
        image_size: int | tuple[int, int] = 64,
        seed: int = 0,
        transforms: Callable | None = None,
        *,
        min_depth: float = 0.5,
        max_depth: float = 10.0,
        max_objects: int = 3,
        strict: bool = True,  # accepted for a uniform API: generated data has no files to miss
    ):
        super().__init__(None, str(split).lower(), transforms, strict=strict)
        self._set_samples(num_samples, image_size, seed, min_side=16)
        if not 0 < min_depth < max_depth:
            raise DatasetError(f"SyntheticDepth: need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.max_objects = int(max_objects)

    def depth_path(self, index: int) -> None:
        return None

    def generate(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(RGB uint8 [3, H, W], depth float32 [1, H, W] in millimetres, 0 = no depth) of sample ``index``."""
        rng = self._rng(index)
        h, w = self.image_size
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
        focal = rng.uniform(0.5, 0.8) * max(h, w)
        horizon = rng.uniform(0.25, 0.45) * h
        cx = w / 2
        lo, hi = self.min_depth, self.max_depth
        has_wall = rng.uniform() < 2 / 3
        wall = rng.uniform(lo + 0.6 * (hi - lo), hi) if has_wall else hi

        # Floor (and wall / sky above the line where the floor reaches the wall or the horizon).
        below = yy > horizon
        floor_depth = np.where(below, CAMERA_HEIGHT * focal / np.maximum(yy - horizon, 1e-6), np.inf)
        on_floor = floor_depth < wall
        depth = np.where(on_floor, np.maximum(floor_depth, lo), wall if has_wall else 0.0)
        # World coordinates of each pixel's surface point: floor (x, z), walls (x, y).
        z = np.where(depth > 0, depth, hi)
        world_x = (xx - cx) * z / focal
        world_y = (horizon - yy) * z / focal + CAMERA_HEIGHT
        u, v = world_x, np.where(on_floor, z, world_y)
        albedo = np.empty((h, w, 3))
        texture = np.empty((h, w))
        for region in (on_floor, ~on_floor):
            albedo[region] = _albedo(rng)
            texture[region] = _pattern(u, v, int(rng.integers(3)), rng.uniform(0.3, 0.8))[region]

        # Boxes standing on the floor, drawn far to near.
        n_objects = int(rng.integers(0, self.max_objects + 1))
        for d in sorted(rng.uniform(lo * 1.5, wall * 0.9, size=n_objects), reverse=True):
            base_row = horizon + CAMERA_HEIGHT * focal / d
            width_m, height_m = rng.uniform(0.4, 1.5), rng.uniform(0.4, 2.0)
            centre = cx + rng.uniform(-0.9, 0.9) * w / 2
            half = width_m * focal / d / 2
            top_row = base_row - height_m * focal / d
            box = (yy >= top_row) & (yy <= base_row) & (np.abs(xx - centre) <= half)
            if not box.any():
                continue
            depth[box] = d
            albedo[box] = _albedo(rng)
            bu, bv = (xx - centre) * d / focal, (base_row - yy) * d / focal
            texture[box] = _pattern(bu, bv, int(rng.integers(3)), rng.uniform(0.15, 0.4))[box]

        # Shading: texture contrast, then fog by depth (the sky is all fog).
        color = albedo * (1.0 + 0.35 * texture)[:, :, None]
        fog_length = 0.4 * hi
        keep = np.where(depth > 0, np.exp(-depth / fog_length), 0.0)[:, :, None]
        image = keep * color + (1 - keep) * FOG_COLOR
        image += rng.normal(0.0, 3.0, size=image.shape)
        image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
        depth_mm = np.round(np.clip(depth, 0, hi) * self.depth_scale).astype(np.float32)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(depth_mm)[None]

    def load_image(self, index: int) -> torch.Tensor:
        return self.generate(index)[0]

    def load_depth(self, index: int) -> torch.Tensor:
        return self.generate(index)[1]

    def load_sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.generate(index)

    def __repr__(self) -> str:
        return (f"SyntheticDepth(split={self.split!r}, num_samples={self.num_samples}, image_size={self.image_size}, "
                f"seed={self.seed}, depth range=({self.min_depth}, {self.max_depth}) m)")
