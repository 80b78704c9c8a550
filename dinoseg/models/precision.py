"""Half-precision weights: which tensors may be stored in bfloat16 / float16 and which stay float32.

Storing a frozen backbone (and, for inference, a head) in half precision halves its memory. The parts that the
official code computes in float32 keep float32 weights: normalisations (their statistics and affine parameters)
and the RoPE periods. A model holding half weights runs its forward under autocast in that dtype (see
`FeatureDecoder`), so matrix products run in half precision while normalisations, softmaxes, the deformable
sampling (`ms_deform_attn_core`) and the score accumulators stay in float32, as under the official mixed
precision; the Mask2Former pixel decoder, which the official code runs outside autocast in float32, runs under
autocast too when its weights are half (see its `forward_features`).
"""

import contextlib
import functools

import torch
from torch import nn

from ..layers.lora import LoRALinear

HALF_DTYPES = (torch.bfloat16, torch.float16)
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
KEEP_FLOAT32_BUFFERS = ("periods",)  # RoPE: the angles of far-away positions need float32 periods


def float32_names(model: nn.Module) -> set[str]:
    """State-dict names of the tensors that stay float32 when `model` is stored in half precision (LoRA adapters
    included: they are small, and train in float32 over half weights)."""
    keep = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LoRALinear):
            keep |= {prefix + "lora_A", prefix + "lora_B"}
        if isinstance(module, NORMS):
            keep |= {prefix + n for n, _ in module.named_parameters()} | {prefix + n for n, _ in module.named_buffers()}
        else:
            keep |= {prefix + n for n, _ in module.named_buffers(recurse=False) if n in KEEP_FLOAT32_BUFFERS}
    return keep


def storage_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype, keep: set[str]) -> torch.dtype:
    """The dtype `tensor` (state-dict entry `name`) is stored in when the model is stored in `dtype`."""
    if not tensor.is_floating_point() or name in keep:
        return tensor.dtype
    return dtype


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store `model`'s floating tensors in `dtype` (float32, bfloat16 or float16), keeping `float32_names` in
    float32; in place, returns `model`."""
    if dtype not in (torch.float32, *HALF_DTYPES):
        raise ValueError(f"weights dtype must be float32, bfloat16 or float16, got {dtype}")
    keep = float32_names(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            for kind in (module._parameters, module._buffers):
                for key, tensor in kind.items():
                    if tensor is None:
                        continue
                    target = storage_dtype(prefix + key, tensor, dtype, keep)
                    if tensor.dtype != target:
                        if isinstance(tensor, nn.Parameter):
                            tensor.data = tensor.data.to(target)
                        else:
                            kind[key] = tensor.to(target)
    return model


def half_weights_dtype(model: nn.Module) -> torch.dtype | None:
    """The half dtype `model` stores (some of) its weights in, None when they are all float32 or wider."""
    for p in model.parameters():
        if p.dtype in HALF_DTYPES:
            return p.dtype
    return None


def weights_autocast(model: nn.Module, device_type: str, dtype: torch.dtype | None = None):
    """Autocast for a forward pass of `model`: `dtype` when it is a half dtype, else the half dtype of `model`'s
    weights, else none (float32 compute)."""
    if dtype not in HALF_DTYPES:
        dtype = half_weights_dtype(model)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def in_weights_precision(method):
    """For a backbone's entry points: with half weights and no autocast active, run under autocast in that
    dtype (float32 inputs work, normalisations stay float32)."""

    @functools.wraps(method)
    def wrapper(self, x, *args, **kwargs):
        device_type = x.device.type if isinstance(x, torch.Tensor) else x[0].device.type
        if torch.is_autocast_enabled(device_type):
            return method(self, x, *args, **kwargs)
        with weights_autocast(self, device_type):
            return method(self, x, *args, **kwargs)

    return wrapper


# torch.export turns an autocast region into a higher-order op (`wrap_with_autocast`; a grad-mode region too, unless
# the export already runs under no_grad), which the ONNX exporter's decomposition traces a second time. An
# exported graph computes in float32 with autocast off, so a region that disables autocast is left out while
# exporting.


def autocast_region(device_type: str, dtype: torch.dtype | None = None, enabled: bool = True):
    """`torch.autocast(device_type, dtype, enabled)`; a disabled region is no context while torch.export traces."""
    if not enabled and torch.compiler.is_exporting():
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled)


def backbone_autocast(device_type: str, backbone_dtype: torch.dtype | None):
    """The autocast region a head runs its frozen backbone in: `backbone_dtype` None leaves the caller's autocast
    as it is, float32 turns it off, a half dtype turns it on in that dtype (`autocast_region`)."""
    if backbone_dtype is None:
        return contextlib.nullcontext()
    low = backbone_dtype != torch.float32
    return autocast_region(device_type, backbone_dtype if low else torch.bfloat16, enabled=low)
