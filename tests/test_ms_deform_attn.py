"""Multi-scale deformable attention: both sampling paths against a naive per-point loop, gradients, module."""

import math

import pytest
import torch

from dinoseg.eval.segmentation.models.utils.ms_deform_attn import MSDeformAttn, ms_deform_attn_core

IMPLS = ["grid_sample", "gather"]


def naive_ms_deform_attn(value, shapes, locations, weights):
    """One bilinear sample at a time, zero outside the map, pixel centres at (i + 0.5) / size."""
    N, _, M, D = value.shape
    _, Lq, _, _, P, _ = locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(N, Lq, M, D, dtype=value.dtype)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(P):
                        x = locations[n, q, m, lvl, p, 0].item() * w - 0.5
                        y = locations[n, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(D, dtype=value.dtype)
                        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= xi < w and 0 <= yi < h:
                                bilinear = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                sample += bilinear * value[n, starts[lvl] + yi * w + xi, m]
                        out[n, q, m] += weights[n, q, m, lvl, p] * sample
    return out.reshape(N, Lq, M * D)


def random_inputs(N, M, D, shapes, Lq, P, dtype=torch.float32, margin=0.15):
    S = sum(h * w for h, w in shapes)
    value = torch.randn(N, S, M, D, dtype=dtype)
    # Some locations fall outside [0, 1] to exercise the zero padding.
    locations = torch.rand(N, Lq, M, len(shapes), P, 2, dtype=dtype) * (1 + 2 * margin) - margin
    weights = torch.rand(N, Lq, M, len(shapes), P, dtype=dtype).softmax(-1)
    return value, shapes, locations, weights


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_naive_per_point_loop(impl):
    # Locations reach well outside the maps (zero padding, and the gather path's clamping to its border ring).
    args = random_inputs(N=2, M=3, D=4, shapes=[(5, 7), (3, 4), (1, 2)], Lq=8, P=2, margin=0.6)
    expected = naive_ms_deform_attn(*args)
    got = ms_deform_attn_core(*args, impl=impl)
    assert got.shape == (2, 8, 12)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl):
    value, shapes, locations, weights = random_inputs(N=1, M=2, D=3, shapes=[(3, 4), (2, 2)], Lq=3, P=2, dtype=torch.float64)
    for t in (value, locations, weights):
        t.requires_grad_(True)

    def fn(v, loc, w):
        return ms_deform_attn_core(v, shapes, loc, w, impl=impl)

    assert fn(value, locations, weights).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (value, locations, weights), eps=1e-6, atol=1e-5)


def test_fast_path_equals_reference_path_on_larger_inputs():
    args = random_inputs(N=2, M=4, D=32, shapes=[(16, 20), (8, 10), (4, 5)], Lq=200, P=4)
    torch.testing.assert_close(
        ms_deform_attn_core(*args, impl="gather"), ms_deform_attn_core(*args, impl="grid_sample"), atol=2e-5, rtol=1e-5
    )
    # The shapes may also come as the [levels, 2] tensor the official code passes.
    value, shapes, loc, w = args
    torch.testing.assert_close(ms_deform_attn_core(value, torch.tensor(shapes), loc, w), ms_deform_attn_core(*args))


@pytest.mark.parametrize("impl", IMPLS)
def test_half_precision_inputs_are_sampled_in_float32(impl):
    value, shapes, loc, w = random_inputs(N=1, M=2, D=16, shapes=[(6, 6), (3, 3)], Lq=20, P=4)
    ref = ms_deform_attn_core(value, shapes, loc, w, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn_core(value.bfloat16(), shapes, loc, w, impl=impl)
    assert out.dtype == torch.bfloat16
    # Only the bf16 rounding of the value and of the output remains (~3 significant digits).
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)


def test_core_rejects_inconsistent_inputs():
    value, shapes, loc, w = random_inputs(N=1, M=2, D=4, shapes=[(4, 4), (2, 2)], Lq=3, P=2)
    with pytest.raises(ValueError, match="cover 17 positions, value has 20"):
        ms_deform_attn_core(value, [(4, 4), (1, 1)], loc, w)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_core(value, shapes, loc, w[..., :1])
    with pytest.raises(ValueError, match="unknown ms_deform_attn_core impl"):
        ms_deform_attn_core(value, shapes, loc, w, impl="cuda")


def test_module_official_parameter_names_and_init():
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2, ratio=0.5)
    shapes = {k: tuple(v.shape) for k, v in attn.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (4 * 3 * 2 * 2, 32),
        "sampling_offsets.bias": (48,),
        "attention_weights.weight": (24, 32),
        "attention_weights.bias": (24,),
        "value_proj.weight": (16, 32),
        "value_proj.bias": (16,),
        "output_proj.weight": (32, 16),
        "output_proj.bias": (32,),
    }
    # Deformable DETR init: head 1 of 4 looks straight down (+y), its point k at distance k + 1.
    offsets = attn.sampling_offsets.bias.view(4, 3, 2, 2)
    torch.testing.assert_close(offsets[1, 0], torch.tensor([[0.0, 1.0], [0.0, 2.0]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MSDeformAttn(d_model=30, n_heads=4)


@pytest.mark.parametrize("impl", IMPLS)
def test_module_forward_backward_and_masks(impl):
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=2, n_points=3, impl=impl)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.1)
    shapes = [(6, 8), (3, 4)]
    feats = torch.randn(2, 60, 32)
    query = torch.randn(2, 5, 32, requires_grad=True)
    ref = torch.rand(1, 5, 2, 2)  # shared by the batch, as the adapter passes it
    out = attn(query, ref, feats, shapes)
    assert out.shape == (2, 5, 32)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())
    assert query.grad.abs().sum() > 0

    # A padding mask zeroes the masked values: masking everything leaves only the output bias.
    masked = attn(query, ref, feats, shapes, None, torch.ones(2, 60, dtype=torch.bool))
    torch.testing.assert_close(masked, attn.output_proj.bias.expand(2, 5, 32))
    # Box reference points (cx, cy, w, h) are accepted too.
    assert attn(query, torch.rand(2, 5, 2, 4), feats, shapes).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="built for 2 levels"):
        attn(query, ref, feats[:, :48], shapes[:1])
