"""The one place that reads checkpoint files, loads them strictly and converts foreign key layouts (Hugging Face)."""

import hashlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
from torch import nn

from .frozen import frozen_names, frozen_prefixes, trainable_backbone_names


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, unreadable, wrong hash or wrong keys/shapes."""


_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.(?:pth|pt|safetensors)$")


def resolve_weights_path(weights: str | os.PathLike, check_hash: bool = False) -> Path:
    """A local path or `file://` URL -> an existing local path; `https://` URLs are downloaded (only then)."""
    text = str(weights)
    scheme = urlparse(text).scheme
    if scheme in ("http", "https"):
        # The only network access in dinoseg, and only because the user passed a URL.
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / os.path.basename(urlparse(text).path)
        if not path.exists():
            try:
                torch.hub.download_url_to_file(text, str(path), progress=True)
            except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, no network
                raise CheckpointError(f"{text}: download failed ({first_line(e)})") from None
    elif scheme == "file":
        path = Path(url2pathname(urlparse(text).path))
    elif scheme in ("", "c", "d") or len(scheme) == 1:  # plain paths (incl. Windows drive letters)
        path = Path(text).expanduser()
    else:
        raise CheckpointError(f"{text}: unsupported URL scheme {scheme!r} (use a path, file:// or https://)")
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if check_hash:
        verify_hash_in_name(path)
    return path


def verify_hash_in_name(path: Path) -> None:
    """Official file names end in `-<sha256 prefix>.pth`; compare that prefix with the file's digest."""
    match = _HASH_IN_NAME.search(path.name)
    if match is None:
        raise CheckpointError(f"{path}: check_hash=True but the file name carries no '-<sha256 prefix>.pth' hash")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise CheckpointError(
            f"{path}: sha256 {digest.hexdigest()[:len(match.group(1))]}... does not match the hash "
            f"{match.group(1)} in its name (corrupt or truncated download?)"
        )


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type when the message is empty (EOFError on a 0-byte file)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_torch_file(path: Path, mmap: bool = False):
    """`torch.load(path, weights_only=True)` on the CPU, every failure one `CheckpointError` naming the file.
    `mmap`: map the tensors' bytes instead of reading them (zip-format files only)."""
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e) or "Unsupported operand" in str(e):  # garbage, not objects
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt? {first_line(e)})") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: holds Python objects beyond tensors{what}; refused") from None
    except Exception as e:  # truncated zip, a text file, ...: torch raises many types
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt? {first_line(e)})") from None


def read_checkpoint_object(path: str | os.PathLike):
    """What a `.pth` / `.pt` checkpoint file holds (tensors memory-mapped when it is zip-format), for the entries
    beside its weights (a run's config, an adaptation record); None for a path that is no such file (a directory,
    safetensors, nothing)."""
    path = Path(path)
    if not path.is_file() or path.suffix == ".safetensors":
        return None
    return read_torch_file(path, mmap=zipfile.is_zipfile(path))


def load_state_dict_file(path: str | os.PathLike, check_hash: bool = False, *,
                         dtype_of: Callable[[str, torch.Tensor], torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """Read a `.pth`/`.pt` (weights_only) or `.safetensors` file, or a Hugging Face model directory.

    Files are read streamed: `.pth` files are memory-mapped (a tensor kept in its stored dtype is used in place,
    without a copy) and `.safetensors` files are read one tensor at a time. `dtype_of(name, tensor)`, when given,
    is the dtype to convert each tensor to as it is read, so that loading a float32 file for a half-precision
    model never holds a float32 copy of the whole model: host memory peaks near the converted model's size.
    """
    path = resolve_weights_path(path, check_hash=check_hash)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise CheckpointError(f"{path}: directory holds no *.safetensors or pytorch_model*.bin file")
        state_dict = {}
        for f in files:
            state_dict.update(load_state_dict_file(f, dtype_of=dtype_of))
        return state_dict
    mapped = False
    if path.suffix == ".safetensors":
        tensors = _safetensors_tensors(path)
    else:
        mapped = zipfile.is_zipfile(path)
        obj = read_torch_file(path, mmap=mapped)
        for wrapper in ("state_dict", "model"):  # trainers (ours, the official segmentation code) wrap the weights
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
        tensors = obj.items()
    state_dict = {}
    reader = _MappedFileReader(path) if mapped else None
    for name, tensor in tensors:
        target = dtype_of(name, tensor) if dtype_of is not None else tensor.dtype
        if target != tensor.dtype:
            # Read the stored bytes with a plain file read rather than through the mapping: pages touched in a
            # mapping stay resident (and the kernel may map far more than the tensor) until the file is unmapped.
            source = reader.read(tensor) if reader is not None else None
            tensor = (source if source is not None else tensor).to(target)
        state_dict[name] = tensor
    if reader is not None:
        reader.close()
    return state_dict


class _MappedFileReader:
    """Reads the bytes behind a tensor of a memory-mapped checkpoint (`torch.load(mmap=True)`) from the file itself,
    located through the mapping's address in /proc/self/maps (Linux); `read` gives None where it cannot."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        self.maps = []
        target = os.stat(path)
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) < 6:
                        continue
                    device, inode = fields[3], int(fields[4])
                    major, minor = (int(v, 16) for v in device.split(":"))
                    if inode == target.st_ino and os.makedev(major, minor) == target.st_dev:
                        start, end = (int(v, 16) for v in fields[0].split("-"))
                        self.maps.append((start, end, int(fields[2], 16)))
        except OSError:  # no /proc: read through the mapping instead
            self.maps = []

    def read(self, tensor: torch.Tensor) -> torch.Tensor | None:
        if not tensor.is_contiguous():
            return None
        address, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        for start, end, file_offset in self.maps:
            if start <= address and address + size <= end:
                data = bytearray(size)
                view = memoryview(data)
                done = 0
                while done < size:
                    n = os.preadv(self.fd, [view[done:]], file_offset + address - start + done)
                    if n <= 0:
                        return None
                    done += n
                out = torch.frombuffer(data, dtype=tensor.dtype) if size else torch.empty(0, dtype=tensor.dtype)
                return out.reshape(tensor.shape)
        return None

    def close(self) -> None:
        os.close(self.fd)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _safetensors_tensors(path: Path):
    """(name, tensor) pairs of a safetensors file, each read on its own (no mapping of the whole file)."""
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
            start = 8 + header_size
            entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
            for name, info in entries:
                begin, end = info["data_offsets"]
                f.seek(start + begin)
                data = bytearray(f.read(end - begin))
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
                yield name, tensor.reshape(info["shape"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def describe_mismatch(module: nn.Module | dict, state_dict: dict[str, torch.Tensor], limit: int = 5) -> str:
    """'' when `state_dict` fits `module` (or its state dict) exactly, else a summary of missing / unexpected /
    mis-shaped keys."""
    own = module if isinstance(module, dict) else module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_state_dict_strict(module: nn.Module, state_dict: dict, source: str = "state dict", assign: bool = False):
    """`load_state_dict(strict=True)` with one readable error naming the source and the keys at fault."""
    problem = describe_mismatch(module, state_dict)
    if problem:
        raise CheckpointError(f"{source}: does not fit {type(module).__name__}: {problem}")
    try:
        module.load_state_dict(state_dict, strict=True, assign=assign)
    except ValueError as e:  # a module's own consistency check (e.g. ConvNeXt's duplicated final norm)
        raise CheckpointError(f"{source}: {e}") from None
    return module


def find_in_hub_cache(filename: str, description: str, url: str, *, key: str = "weights") -> Path:
    """A released file in the torch hub cache; dinoseg never downloads one unless given its https URL. `key`: the
    argument (or command-line key) that takes the file instead, for the message."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.exists():
        raise CheckpointError(
            f"{cached}: {description} not found; dinoseg never downloads implicitly: download it from Meta "
            f"(e.g. {url}) and pass {key}=<path>, or pass the https URL explicitly"
        )
    return cached


def load_head_state_dict(model: nn.Module, state_dict: dict, source: str, assign: bool = False) -> None:
    """Strict on the head: every head key must be present with its shape, and nothing else (backbone keys
    included: the frozen backbone keeps its own weights; an adapted backbone's adapted tensors are part of the
    head checkpoint). `assign=True` for a head built on the meta device."""
    skip, adapted = tuple(frozen_prefixes(model)), trainable_backbone_names(model)
    stray = [k for k in state_dict if k.startswith(skip) and k not in adapted]
    if stray:
        raise CheckpointError(f"{source}: head checkpoint holds {len(stray)} backbone keys ({', '.join(stray[:3])}); "
                              f"the backbone is loaded from its own checkpoint")
    frozen = frozen_names(model)
    head = {k: v for k, v in model.state_dict().items() if k not in frozen}
    problem = describe_mismatch(head, state_dict)
    if problem:
        raise CheckpointError(f"{source}: head checkpoint does not fit the configured model: {problem}")
    full = model.state_dict()
    full.update(state_dict)
    model.load_state_dict(full, strict=True, assign=assign)


# -- Hugging Face transformers layout (DINOv3ViTModel) ------------------------------------------------------------

def is_hf_dinov3_state_dict(state_dict: dict) -> bool:
    return any(k.startswith("embeddings.patch_embeddings") for k in state_dict)


def hf_config_to_official_kwargs(config: dict) -> dict:
    """Map a `DINOv3ViTConfig` (config.json) to `DinoVisionTransformer` keywords."""
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    gated = config.get("use_gated_mlp", False)
    act = config.get("hidden_act", "gelu")
    if act != ("silu" if gated else "gelu"):
        # DINOv3's MLP is GELU and its SwiGLU is SiLU-gated; any other activation is another model.
        raise CheckpointError(f"config.json: hidden_act={act!r} with use_gated_mlp={gated} is not a DINOv3 layout")
    if gated:
        ffn_layer, ffn_ratio = _gated_ffn_settings(hidden, inter)
    else:
        ffn_layer, ffn_ratio = "mlp", inter / hidden
    eps = config.get("layer_norm_eps", 1e-5)
    has_qv_bias = config.get("query_bias", True) or config.get("value_bias", True)
    return dict(
        patch_size=config.get("patch_size", 16),
        in_chans=config.get("num_channels", 3),
        pos_embed_rope_base=config.get("rope_theta", 100.0),
        pos_embed_rope_normalize_coords="separate",
        pos_embed_rope_shift_coords=config.get("pos_embed_shift"),
        pos_embed_rope_jitter_coords=config.get("pos_embed_jitter"),
        pos_embed_rope_rescale_coords=config.get("pos_embed_rescale"),
        pos_embed_rope_dtype="fp32",
        embed_dim=hidden,
        depth=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        ffn_ratio=ffn_ratio,
        qkv_bias=bool(has_qv_bias),
        layerscale_init=config.get("layerscale_value", 1.0),
        norm_layer="layernormbf16" if abs(eps - 1e-5) < 1e-9 else "layernorm",
        ffn_layer=ffn_layer,
        ffn_bias=config.get("mlp_bias", True),
        proj_bias=config.get("proj_bias", True),
        n_storage_tokens=config.get("num_register_tokens", 0),
        mask_k_bias=bool(has_qv_bias),
    )


def _gated_ffn_settings(hidden: int, inter: int) -> tuple[str, float]:
    from ..layers.ffn_layers import SwiGLUFFN

    for layer, align in (("swiglu", 8), ("swiglu64", 64), ("swiglu32", 32), ("swiglu128", 128)):
        for ratio in (6.0, 3.0, 4.0, 8 / 3):
            d = int(int(hidden * ratio) * 2 / 3)
            if d + (-d % align) == inter:
                return layer, ratio
    ratio = inter * 3 / (2 * hidden)
    if SwiGLUFFN(hidden, int(hidden * ratio), align_to=1, device="meta").w1.out_features == inter:
        return "swiglu1", ratio
    raise CheckpointError(f"cannot express a gated MLP of size {inter} on width {hidden} as a DINOv3 SwiGLU")


def convert_hf_dinov3_state_dict(sd: dict[str, torch.Tensor], periods: torch.Tensor) -> dict[str, torch.Tensor]:
    """`DINOv3ViTModel` keys -> official keys. `periods` (the RoPE buffer HF does not store) comes from the model."""
    sd = {re.sub(r"^(dinov3\.|model\.(?=layer\.))", "", k): v for k, v in sd.items()}
    out = {
        "cls_token": sd.pop("embeddings.cls_token"),
        "mask_token": sd.pop("embeddings.mask_token").reshape(1, -1),
        "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.weight"),
        "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.bias"),
        "rope_embed.periods": periods.clone(),
        "norm.weight": sd.pop("norm.weight"),
        "norm.bias": sd.pop("norm.bias"),
    }
    if "embeddings.register_tokens" in sd:
        tokens = sd.pop("embeddings.register_tokens")
        if tokens.shape[1]:
            out["storage_tokens"] = tokens
    layer_ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layer\.(\d+)\.", k))})
    ffn_names = {"up_proj": "fc1", "down_proj": "fc2"}
    gated_names = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}
    for i in layer_ids:
        src, dst = f"layer.{i}.", f"blocks.{i}."
        for n in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                out[f"{dst}{n}.{p}"] = sd.pop(f"{src}{n}.{p}")
        q, k, v = (sd.pop(f"{src}attention.{n}_proj.weight") for n in "qkv")
        out[f"{dst}attn.qkv.weight"] = torch.cat([q, k, v])
        biases = [sd.pop(f"{src}attention.{n}_proj.bias", None) for n in "qkv"]
        if any(b is not None for b in biases):
            dim = q.shape[0]
            filled = [b if b is not None else torch.zeros(dim, dtype=q.dtype) for b in biases]
            out[f"{dst}attn.qkv.bias"] = torch.cat(filled)
            out[f"{dst}attn.qkv.bias_mask"] = torch.cat(
                [torch.ones(dim) if b is not None else torch.zeros(dim) for b in biases]
            )
        out[f"{dst}attn.proj.weight"] = sd.pop(f"{src}attention.o_proj.weight")
        if f"{src}attention.o_proj.bias" in sd:
            out[f"{dst}attn.proj.bias"] = sd.pop(f"{src}attention.o_proj.bias")
        out[f"{dst}ls1.gamma"] = sd.pop(f"{src}layer_scale1.lambda1")
        out[f"{dst}ls2.gamma"] = sd.pop(f"{src}layer_scale2.lambda1")
        names = gated_names if f"{src}mlp.gate_proj.weight" in sd else ffn_names
        for hf, ours in names.items():
            for p in ("weight", "bias"):
                if f"{src}mlp.{hf}.{p}" in sd:
                    out[f"{dst}mlp.{ours}.{p}"] = sd.pop(f"{src}mlp.{hf}.{p}")
    # Anything left is a key we do not understand: let the strict load report it.
    out.update(sd)
    return out


def read_hf_config(path: Path) -> dict | None:
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg.exists():
        return None
    with open(cfg) as f:
        return json.load(f)
