"""Depth on a CUDA device: parity with the official float32 outputs, the effect of TF32 convolutions and of
bf16 autocast, the evaluation loop on the device, and the released architectures' speed and memory.

    python benchmarks/depth_device_check.py [--size 512 672] [--skip-hub]

Errors are printed in units of the parity tolerance (atol = rtol = 1e-5): <= 1 passes. PyTorch's default
``torch.backends.cudnn.allow_tf32 = True`` runs float32 convolutions in TF32; the check shows how far that
moves the depth, and runs the evaluation loop with TF32 off. The hub depthers use random weights.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinoseg.data import make_dataset
from dinoseg.data.adapters import DatasetWithEnumeratedTargets
from dinoseg.eval.depth.config import ResultConfig
from dinoseg.eval.depth.eval import evaluate_depther_with_dataloader
from dinoseg.eval.depth.metrics import DEPTH_METRICS
from dinoseg.eval.depth.transforms import make_depth_eval_transforms
from dinoseg.hub.depthers import dinov3_vit7b16_dd, dinov3_vitl16_chmv2
from tests._depth_fixtures import DEPTHER_FIXTURES, depth_index, load_depth_fixture, official_depther, write_nyu_layout


def _error_in_tolerances(depther, data, device) -> float:
    worst = 0.0
    for x, ref in zip(data["x"], data["depth"]):
        with torch.no_grad():
            y = depther(x.to(device)).cpu()
        worst = max(worst, ((y - ref).abs() / (1e-5 + 1e-5 * ref.abs())).max().item())
    return worst


def parity(device) -> None:
    for name in DEPTHER_FIXTURES:
        depther = official_depther(name)[0].to(device)
        data = load_depth_fixture(name)
        default = _error_in_tolerances(depther, data, device)
        torch.backends.cudnn.allow_tf32 = False
        strict = _error_in_tolerances(depther, data, device)
        torch.backends.cudnn.allow_tf32 = True
        depther.autocast_dtype = torch.bfloat16
        low = _error_in_tolerances(depther, data, device)
        print(f"{name}: error / tolerance: float32 {default:.2f} (TF32 convs), {strict:.2f} (no TF32); bf16 {low:.0f}")


def eval_loop(device) -> None:
    torch.backends.cudnn.allow_tf32 = False
    for fixture in ("eval_linear_nyu.pt", "eval_dpt_cls_log_sigmoid.pt"):
        meta, data = depth_index()[fixture], load_depth_fixture(fixture)
        root = Path(tempfile.mkdtemp())
        write_nyu_layout(root, meta, data)
        depther = official_depther(meta["depther"])[0].to(device)
        for setting_name, s in meta["settings"].items():
            transform = make_depth_eval_transforms(normalization_constant=1000.0, img_size=meta["transforms"]["img_size"],
                                                   tta=s["use_tta"])
            dataset = make_dataset(f"NYU:split=VAL:root={root}", transforms=transform)
            loader = DataLoader(DatasetWithEnumeratedTargets(dataset), batch_size=1)
            results, _, _ = evaluate_depther_with_dataloader(
                loader, depther, device, DEPTH_METRICS, tuple(s["eval_range"]), ResultConfig(),
                eval_mask_type=s["eval_mask_type"], align_least_squares=s["align_least_squares"], use_tta=s["use_tta"])
            ref = data["results"][setting_name]["reduced"]
            worst = max(abs(results[k] - v.item()) / (1e-5 + 1e-5 * abs(v.item())) for k, v in ref.items())
            print(f"eval loop {fixture} {setting_name}: error / tolerance {worst:.2f}")
    torch.backends.cudnn.allow_tf32 = True


def hub(device, size) -> None:
    for fn in (dinov3_vitl16_chmv2, dinov3_vit7b16_dd):
        start = time.perf_counter()
        depther = fn(pretrained=False, device=device)
        torch.cuda.synchronize()
        build = time.perf_counter() - start
        x = torch.randn(2, 3, *size, device=device)
        for dtype in (torch.bfloat16, torch.float32):
            depther.autocast_dtype = dtype
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                y = depther(x)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(3):
                    y = depther(x)
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / 3 * 1000
            print(f"{fn.__name__} ({sum(p.numel() for p in depther.parameters()):,} parameters, built in {build:.0f} s), "
                  f"{str(dtype)[6:]}: depth {tuple(y.shape)}, {ms:.0f} ms per batch of 2, "
                  f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        del depther
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(512, 672))
    parser.add_argument("--skip-hub", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(device))
    parity(device)
    eval_loop(device)
    if not args.skip_hub:
        hub(device, args.size)


if __name__ == "__main__":
    main()
