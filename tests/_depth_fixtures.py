"""Helpers for the depth parity tests: the official reference outputs in tests/fixtures/official/depth."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinoseg.eval.depth.models import DecoderConfig, Depther, make_depther_from_config
from dinoseg.models.vision_transformer import DinoVisionTransformer

DEPTH_FIXTURES = Path(__file__).parent / "fixtures" / "official" / "depth"
TOL = dict(atol=1e-5, rtol=1e-5)


@cache
def depth_index() -> dict:
    return json.loads((DEPTH_FIXTURES / "index.json").read_text())


def load_depth_fixture(name: str) -> dict:
    return torch.load(DEPTH_FIXTURES / name, map_location="cpu", weights_only=True)


DEPTHER_FIXTURES = sorted(k for k in json.loads((DEPTH_FIXTURES / "index.json").read_text()) if k.startswith("depther_"))


def official_depther(name: str, legacy_fusion_resize: bool = True) -> tuple[Depther, dict]:
    """The fixture's depther, built from its settings and loaded strictly; DPT heads resize as the official code
    (`legacy_fusion_resize`) unless asked otherwise."""
    meta = depth_index()[name]
    data = load_depth_fixture(name)
    config = dict(meta["decoder_config"])
    if config["type"] == "dpt":
        config["head_kwargs"] = dict(config.get("head_kwargs", {}), legacy_fusion_resize=legacy_fusion_resize)
    backbone = DinoVisionTransformer(**meta["official_kwargs"])
    depther = make_depther_from_config(backbone, DecoderConfig(**config), autocast_dtype=torch.float32)
    depther.load_state_dict(data["state_dict"], strict=True)
    return depther.eval(), data


def write_nyu_layout(root: Path, meta: dict, data: dict) -> None:
    """The eval fixture's 3 samples as an NYU folder: nyu_test.txt, RGB PNGs and 16-bit depth PNGs (mm)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "nyu_test.txt").write_text("".join(meta["nyu_test_txt"]))
    for rel, i in meta["nyu_files"].items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if "rgb" in Path(rel).name:
            Image.fromarray(data["images"][i].numpy()).save(path)
        else:
            Image.fromarray(data["depths"][i].numpy().astype(np.uint16)).save(path)
