"""The released ViT-7B + ViT-Adapter + Mask2Former ADE20K segmentor in small memory: float32 against half-precision
weights under the official protocol (short side 896, slide 896 / 596, test-time scales 0.9 ... 1.1 and flips).

    python benchmarks/big_model_memory.py --device cuda             # the full 7B segmentor, random weights
    python benchmarks/big_model_memory.py --device cpu --proxy      # a depth-8 backbone of the 7B's width

The segmentor is `dinov3_vit7b16_ms(pretrained=False)` (hidden 2048, 150 classes) with random weights, its class
embeddings scaled up 100x so that classes are decided as a trained head's are (at their initial scale the class
scores are near-uniform, and their near-ties flip under any rounding). One image
(896 x 1195 on CUDA) goes through the official protocol with the weights in float32, then, cast in place with
`cast_weights` (what `dtype=` / `model.weights_dtype` do), in each half dtype asked for. Per dtype it prints the
weights' memory, the peak memory of the inference (CUDA: `max_memory_allocated`; CPU: the process's VmHWM, reset
before each run), seconds per image, and the share of pixels whose class agrees with the float32 weights (all
pixels, and pixels whose float32 top-2 margin exceeds 0.05). `--skip-float32` runs the half dtypes only (no agreement
columns); `--memory-trace` (CUDA) records the allocations of the last run and prints those alive at its peak, largest
first, with the dinoseg lines that made them: where the memory above the weights goes.

The CPU proxy keeps the 7B's width (embed 4096, 32 heads, SwiGLU) and head but 8 blocks, on a 448 x 598 image with
the protocol scaled by 1/2 and one test-time scale (plus its flip), so that it runs in minutes on two cores.
"""

import argparse
import time

import torch

from dinoseg.eval.segmentation.inference import InferenceMode, InferenceSettings
from dinoseg.hub import dinov3_vit7b16_ms
from dinoseg.models.precision import cast_weights


def cpu_peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cpu_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def run(model, image, settings, device) -> tuple[torch.Tensor, float, int]:
    """(probabilities, seconds, peak bytes above the weights) of one image."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        cpu_peak_reset()
        base = cpu_status("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        probs = settings(image, model, rescale_to=tuple(image.shape[-2:]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else cpu_status("VmHWM")
    return probs.cpu(), seconds, peak - base


def peak_allocations(snapshot: dict, top: int = 15) -> tuple[int, list[tuple[int, str]]]:
    """Replays the allocation trace of `torch.cuda.memory._snapshot()`: (peak bytes allocated during the trace
    above its start, the `top` largest blocks alive at that peak as (bytes, where allocated))."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: list[tuple[int, str]] = []
    for event in snapshot["device_traces"][0]:
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            frames = [f"{f['filename'].split('dinoseg/')[-1]}:{f['line']} {f['name']}" for f in event.get("frames", [])
                      if "dinoseg/" in f["filename"]]
            live[addr] = (size, " < ".join(frames[:4]) or "(outside dinoseg)")
            total += size
            if total > peak:
                peak, at_peak = total, sorted(live.values(), reverse=True)[:top]
        elif action == "free_completed" and addr in live:
            total -= live.pop(addr)[0]
    return peak, at_peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--proxy", action="store_true", help="a depth-8 backbone (the CPU proxy)")
    p.add_argument("--dtypes", default="bfloat16", help="comma-separated half dtypes to compare with float32")
    p.add_argument("--crop-batch-size", type=int, default=1)
    p.add_argument("--warmup", action="store_true", help="one untimed image first (CUDA kernels, allocator)")
    p.add_argument("--skip-float32", action="store_true", help="cast to the half dtypes first: no float32 run")
    p.add_argument("--memory-trace", action="store_true", help="CUDA: the allocations alive at the last run's peak")
    args = p.parse_args()
    device = torch.device(args.device)
    scale = 2 if args.proxy else 1
    torch.manual_seed(0)
    model = dinov3_vit7b16_ms(pretrained=False, device=device, backbone_options={"depth": 8} if args.proxy else None)
    model.eval()
    with torch.no_grad():
        model.segmentation_model[1].predictor.class_embed.weight.mul_(100)
    settings = InferenceSettings(
        mode=InferenceMode.SLIDE, crop_size=(896 // scale,) * 2, stride=(596 // scale,) * 2,
        crop_batch_size=args.crop_batch_size, tta_ratios=(1.0,) if args.proxy else (0.9, 0.95, 1.0, 1.05, 1.1),
        use_flip=True, small_size=896 // scale, decoder_head_type="m2f",
    )
    image = torch.randn(1, 3, 896 // scale, 1195 // scale, device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    blocks = model.segmentation_model[0].backbone.n_blocks
    print(f"device: {name}; ViT-7B width, {blocks} blocks + adapter + Mask2Former (hidden 2048); image "
          f"{tuple(image.shape[-2:])}, slide {settings.crop_size[0]}/{settings.stride[0]}, scales {settings.tta_ratios} "
          f"+ flip, crop batch {args.crop_batch_size}, autocast bfloat16 (the hub default)")
    if args.warmup:
        run(model, image, settings, device)
    print(f"{'weights':>9} {'weights GiB':>11} {'peak GiB':>8} {'+weights':>8} {'s/image':>7} {'agree %':>7} "
          f"{'decided %':>9}", flush=True)
    reference = decided = None
    if not args.skip_float32:
        reference, seconds, peak = run(model, image, settings, device)
        size = weights_bytes(model)
        print(f"{'float32':>9} {size / 2**30:11.2f} {peak / 2**30:8.2f} {(peak + size) / 2**30:8.2f} {seconds:7.2f} "
              f"{100:7.2f} {100:9.2f}", flush=True)
        top2 = reference.topk(2, dim=1).values
        decided = (top2[:, 0] - top2[:, 1]) > 0.05
    dtypes = args.dtypes.split(",")
    for i, dtype in enumerate(dtypes):
        cast_weights(model, getattr(torch, dtype))
        trace = args.memory_trace and device.type == "cuda" and i == len(dtypes) - 1
        if trace:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        probs, seconds, peak = run(model, image, settings, device)
        size = weights_bytes(model)
        agreement = ""
        if reference is not None:
            same = probs.argmax(1) == reference.argmax(1)
            agreement = (f"{100 * same.float().mean():7.2f} {100 * same[decided].float().mean():9.2f}  "
                         f"(decided pixels: {100 * decided.float().mean():.1f}%)")
        print(f"{dtype:>9} {size / 2**30:11.2f} {peak / 2**30:8.2f} {(peak + size) / 2**30:8.2f} {seconds:7.2f} "
              f"{agreement}", flush=True)
        if trace:
            traced_peak, blocks = peak_allocations(torch.cuda.memory._snapshot())
            torch.cuda.memory._record_memory_history(enabled=None)
            print(f"allocations alive at the peak of the {dtype} run ({traced_peak / 2**30:.2f} GiB above the start of "
                  f"the trace), largest first:")
            for nbytes, where in blocks:
                print(f"  {nbytes / 2**20:9.1f} MiB  {where}")


if __name__ == "__main__":
    main()
