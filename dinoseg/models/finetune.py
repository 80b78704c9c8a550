"""Adapting a frozen backbone (`model.finetune`): LoRA adapters, or its last blocks, train; the rest stays frozen.

- `adapt_backbone(backbone, mode, ...)` adapts a built DINOv3 ViT or ConvNeXt in place. `lora` replaces the
  targeted linear layers of its blocks with `LoRALinear` (official keys kept, adapters `lora_A` / `lora_B` added,
  B = 0: outputs unchanged until B trains); `blocks` trains the parameters of the last N blocks (ConvNeXt: the
  last N stages, each with the downsampling layer in front of it). The final norms stay frozen in both modes: the
  official `blocks_to_train` selects block parameters only, and the final norm is applied to the outputs of
  every block a head reads, so training it would change features of blocks meant to stay frozen. `frozen` leaves
  the backbone untouched.
- The backbone is marked frozen with an `Adaptation` record (`dinoseg.models.frozen`), which checkpoints, DDP
  and training-mode switching read: what trains, and which blocks run in training mode (stochastic depth).
- Checkpoint helpers: the adapted tensors' names and state dict, strict loading, merging LoRA into the weights
  (export), parameter groups with a backbone lr multiplier and layer-wise lr decay, and the identity of the base
  backbone so that adapted tensors are never applied to another one.

Errors in the values are `FinetuneError` (a ValueError) naming the `model.finetune` key.
"""

import contextlib
import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from ..layers.lora import LoRALinear
from .backbones import _weights_location
from .checkpoint import CheckpointError, describe_mismatch, read_checkpoint_object, resolve_weights_path
from .convnext import ConvNeXt
from .frozen import ADAPTATION, Adaptation, adaptation_of, freeze_backbone
from .precision import HALF_DTYPES
from .vision_transformer import DinoVisionTransformer

MODES = ("frozen", "lora", "blocks")
# The layers LoRA adapts when `targets` is None.
DEFAULT_LORA_TARGETS = {DinoVisionTransformer: ("qkv", "proj"), ConvNeXt: ("pwconv1", "pwconv2")}


class FinetuneError(ValueError):
    """A `model.finetune` value that cannot apply to this backbone; the message names the key and the value."""

    def __init__(self, key: str, value, why: str):
        self.key = key
        super().__init__(f"model.finetune.{key}={value!r}: {why}")


class BackboneMismatchError(CheckpointError):
    """Adapted tensors recorded for another backbone than the one they are being applied to."""


# -- structure -----------------------------------------------------------------------------------------------------

def n_layers(backbone: nn.Module) -> int:
    """Blocks of a ViT, stages of a ConvNeXt: the units of `blocks` and of the layer-wise lr decay."""
    return len(backbone.blocks) if isinstance(backbone, DinoVisionTransformer) else len(backbone.stages)


def _units(backbone: nn.Module, first: int, stop: int) -> list[str]:
    """Module names of blocks (ConvNeXt: stages with their downsampling layer) `first` .. `stop - 1`."""
    if isinstance(backbone, DinoVisionTransformer):
        return [f"blocks.{i}" for i in range(first, stop)]
    return [name for i in range(first, stop) for name in (f"downsample_layers.{i}", f"stages.{i}")]


def _residual_blocks(backbone: nn.Module, stop: int) -> list[str]:
    """Module names of the residual blocks of the first `stop` layers (ConvNeXt: every block of those stages)."""
    if isinstance(backbone, DinoVisionTransformer):
        return [f"blocks.{i}" for i in range(stop)]
    return [f"stages.{i}.{j}" for i in range(stop) for j in range(len(backbone.stages[i]))]


def layer_id(backbone: nn.Module, name: str) -> int:
    """Depth of backbone tensor `name` for layer-wise lr decay (the BEiT / DINOv2 convention): the patch embedding
    and tokens (ConvNeXt: the stem) are layer 0, block (ConvNeXt: stage) i is layer i + 1, the final norms are
    layer n + 1, like the head."""
    parts = name.split(".")
    n = n_layers(backbone)
    if isinstance(backbone, DinoVisionTransformer):
        if parts[0] == "blocks":
            return int(parts[1]) + 1
        return n + 1 if parts[0] in ("norm", "cls_norm", "local_cls_norm", "head") else 0
    if parts[0] in ("stages", "downsample_layers"):
        stage = int(parts[1])
        return 0 if parts[0] == "downsample_layers" and stage == 0 else stage + 1
    return n + 1 if parts[0] in ("norm", "norms", "head") else 0


# -- adapting ------------------------------------------------------------------------------------------------------

def _check_int(key: str, value, low: int, high: int | None = None, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise FinetuneError(key, value, why or f"must be an integer {bound}")


def adapt_backbone(
    backbone: nn.Module,
    mode: str = "frozen",
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: list[str] | tuple[str, ...] | None = None,
    blocks: int = 2,
    gradient_checkpointing: bool = False,
    last_read_block: int | None = None,
    seed: int = 0,
    identity: dict | None = None,
) -> nn.Module:
    """Adapt `backbone` (a DINOv3 ViT or ConvNeXt with its weights loaded) in place and return it, frozen but for
    the adapted tensors (see the module docstring). `mode` "frozen" returns it untouched.

    rank, alpha: LoRA rank and scale (the update is alpha / rank * B A). targets: names of the linear layers of the
    blocks to adapt (ViT: qkv, proj, fc1, fc2, or w1, w2, w3 for SwiGLU; ConvNeXt: pwconv1, pwconv2); None for
    `DEFAULT_LORA_TARGETS`. blocks: how many of the last blocks (ConvNeXt: stages) train. gradient_checkpointing:
    recompute the activations of the blocks that train in the backward pass. last_read_block: the deepest block
    (ConvNeXt: stage) the head reads, None for the last: blocks past it never run, so LoRA leaves them alone and
    `blocks` counts back from it. seed: draws the LoRA `A` matrices (the global RNG is not touched). identity:
    the base backbone's `backbone_identity`, kept with the adaptation for the checkpoints to record.
    """
    if mode not in MODES:
        raise FinetuneError("mode", mode, f"expected one of {', '.join(MODES)}")
    if mode == "frozen":
        return backbone
    if not isinstance(backbone, (DinoVisionTransformer, ConvNeXt)):
        raise FinetuneError("mode", mode, f"adapts a DinoVisionTransformer or ConvNeXt, not a {type(backbone).__name__}")
    if adaptation_of(backbone) is not None:
        raise FinetuneError("mode", mode, f"this backbone is already adapted ({adaptation_of(backbone).mode})")
    if any(p.device.type == "meta" for p in backbone.parameters()):
        raise ValueError("adapt_backbone: load the backbone's weights first (its tensors are on the meta device)")
    n = n_layers(backbone)
    if last_read_block is not None:
        _check_int("last_read_block", last_read_block, 0, n - 1)
    used = n if last_read_block is None else last_read_block + 1
    settings = {"mode": mode, "last_read_block": last_read_block}
    if mode == "lora":
        _check_int("lora_rank", rank, 1)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise FinetuneError("lora_alpha", alpha, "must be a number > 0")
        targets = _lora_targets(backbone, targets, used)
        trainable, train_modules = _add_lora(backbone, rank, float(alpha), targets, used, seed)
        settings.update(lora_rank=rank, lora_alpha=float(alpha), lora_targets=list(targets))
    else:
        what = "blocks" if isinstance(backbone, DinoVisionTransformer) else "stages"
        reach = f" (the head reads up to {what[:-1]} {used - 1})" if used < n else ""
        _check_int("blocks", blocks, 1, used, f"must be an integer in [1, {used}]: this backbone has {n} {what}{reach}")
        train_modules = tuple(_units(backbone, used - blocks, used))
        trainable = tuple(f"{unit}.{p}" for unit in train_modules
                          for p, _ in backbone.get_submodule(unit).named_parameters())
        _float32(backbone, trainable)  # trained tensors keep float32 master weights under half-precision storage
        settings.update(blocks=blocks)
    settings.update(gradient_checkpointing=bool(gradient_checkpointing))
    for unit in train_modules:
        for module in backbone.get_submodule(unit).modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = bool(gradient_checkpointing)
    setattr(backbone, ADAPTATION, Adaptation(mode, trainable, train_modules, settings, identity))
    if mode == "lora" and not getattr(backbone, "_dinoseg_lora_hook", False):
        backbone.register_load_state_dict_pre_hook(_keep_adapters_on_base_load)
        backbone._dinoseg_lora_hook = True
    return freeze_backbone(backbone)


def _lora_targets(backbone: nn.Module, targets, used: int) -> tuple[str, ...]:
    available = sorted({name.rsplit(".", 1)[-1] for block in _residual_blocks(backbone, used)
                        for name, m in backbone.get_submodule(block).named_modules() if isinstance(m, nn.Linear)})
    if targets is None:
        return DEFAULT_LORA_TARGETS[type(backbone)]
    if isinstance(targets, str) or not targets:
        raise FinetuneError("lora_targets", targets, f"expected a non-empty list of layer names among {available}")
    for target in targets:
        if target not in available:
            raise FinetuneError("lora_targets", list(targets), f"{target!r} matches no linear layer of this "
                                f"{type(backbone).__name__}'s blocks; they are {', '.join(available)}")
    if len(set(targets)) != len(targets):
        raise FinetuneError("lora_targets", list(targets), "lists a layer twice")
    return tuple(targets)


def _add_lora(backbone: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], used: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    trainable, train_modules = [], []
    for block in _residual_blocks(backbone, used):
        block_module = backbone.get_submodule(block)
        layers = [(name, m) for name, m in block_module.named_modules()
                  if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
        for name, layer in layers:
            parent_name, _, attr = name.rpartition(".")
            parent = block_module.get_submodule(parent_name) if parent_name else block_module
            setattr(parent, attr, LoRALinear(layer, rank, alpha, generator=generator))
            trainable += [f"{block}.{name}.lora_A", f"{block}.{name}.lora_B"]
        if layers:
            train_modules.append(block)
    return tuple(trainable), tuple(train_modules)


def _float32(backbone: nn.Module, names) -> None:
    for name in names:
        param = backbone.get_parameter(name)
        if param.dtype in HALF_DTYPES:
            param.data = param.data.float()


def _keep_adapters_on_base_load(module, state_dict, prefix, *args) -> None:
    # A state dict without any adapter (an official checkpoint: the base weights) loads strictly into an adapted
    # backbone, its adapters keeping their values; one holding some adapters must hold them all (strict load).
    adaptation = adaptation_of(module)
    if adaptation is None or adaptation.mode != "lora":
        return
    if any(prefix + name in state_dict for name in adaptation.trainable):
        return
    for name in adaptation.trainable:
        state_dict[prefix + name] = module.get_parameter(name).detach()


# -- checkpoints ---------------------------------------------------------------------------------------------------

def adapted_names(backbone: nn.Module) -> tuple[str, ...]:
    """Names (relative to the backbone) of the adapted tensors: what a checkpoint holds of the backbone."""
    adaptation = adaptation_of(backbone)
    return adaptation.trainable if adaptation is not None else ()


def adapted_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The adapted tensors, detached, on the CPU."""
    return {name: backbone.get_parameter(name).detach().cpu() for name in adapted_names(backbone)}


def load_adapted_state_dict(backbone: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapted tensors into an adapted backbone, strictly: every adapted tensor present with its shape, and
    nothing else (a `CheckpointError` names `source` and the keys at fault)."""
    own = {name: backbone.get_parameter(name) for name in adapted_names(backbone)}
    problem = describe_mismatch(own, state_dict)
    if problem:
        raise CheckpointError(f"{source}: adapted tensors do not fit the configured backbone: {problem}")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(state_dict[name])


def merge_lora(backbone: nn.Module) -> nn.Module:
    """Fold the LoRA adapters into the base weights, in place: the backbone becomes a plain frozen one (official
    keys only, outputs equal to the adapted ones up to rounding). Other backbones are returned unchanged."""
    adaptation = adaptation_of(backbone)
    if adaptation is None or adaptation.mode != "lora":
        return backbone
    for name, module in list(backbone.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(backbone.get_submodule(parent_name), attr, module.merged())
    delattr(backbone, ADAPTATION)
    return freeze_backbone(backbone)


def param_groups(model: nn.Module, weight_decay: float, *legacy: float, lr: float | None = None,
                 lr_multiplier: float = 0.1, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups over the trainable parameters of `model`, for `engine.optim.build_optimizer`: the
    head first (`lr_scale` 1, `weight_decay`), then the adapted backbone tensors at `lr_scale` = `backbone_lr_scales`
    (lr_multiplier x layer_decay ** (n + 1 - layer_id)), without weight decay on 1-D tensors (biases, norms,
    layer scales), as in BEiT / DINOv2 fine-tuning. Without an adapted backbone this is one group, the optimizer
    of a frozen backbone.

    The earlier form `param_groups(model, lr, weight_decay)` (or `lr=`) still works, with a DeprecationWarning: its
    groups also carry their absolute `lr` (lr x lr_scale), for a plain `torch.optim.AdamW`."""
    if legacy or lr is not None:
        if legacy:  # param_groups(model, lr, weight_decay): the second argument was the lr
            if len(legacy) != 1 or lr is not None:
                raise TypeError("param_groups(model, weight_decay, *, lr_multiplier=..., layer_decay=...)")
            lr, weight_decay = weight_decay, legacy[0]
        warnings.warn("param_groups(model, lr, weight_decay) is deprecated: call param_groups(model, weight_decay) "
                      "and give the lr to engine.optim.build_optimizer (groups carry lr_scale)", DeprecationWarning,
                      stacklevel=2)
        groups = param_groups(model, weight_decay, lr_multiplier=lr_multiplier, layer_decay=layer_decay)
        return [{**group, "lr": lr * group["lr_scale"]} for group in groups]
    scales = backbone_lr_scales(model, lr_multiplier=lr_multiplier, layer_decay=layer_decay)
    head = [p for name, p in model.named_parameters() if p.requires_grad and name not in scales]
    groups = [{"params": head, "lr_scale": 1.0, "weight_decay": weight_decay}] if head else []
    by_key: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if name not in scales or not param.requires_grad:
            continue
        decay = weight_decay if param.ndim >= 2 else 0.0
        key = (scales[name], decay)
        if key not in by_key:
            by_key[key] = {"params": [], "lr_scale": scales[name], "weight_decay": decay}
            groups.append(by_key[key])
        by_key[key]["params"].append(param)
    return groups


def backbone_lr_scales(model: nn.Module, *, lr_multiplier: float = 0.1, layer_decay: float = 1.0) -> dict[str, float]:
    """Name in `model` -> learning-rate scale (relative to the head's) of every adapted backbone tensor:
    lr_multiplier x layer_decay ** (n + 1 - layer_id), n the backbone's depth (see `layer_id`)."""
    if isinstance(lr_multiplier, bool) or not isinstance(lr_multiplier, (int, float)) or not lr_multiplier > 0:
        raise FinetuneError("lr_multiplier", lr_multiplier, "must be a number > 0")
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
        raise FinetuneError("layer_decay", layer_decay, "must be a number in (0, 1]")
    scales = {}
    for prefix, backbone in adapted_backbones(model):
        n = n_layers(backbone)
        for name in adapted_names(backbone):
            scales[prefix + name] = lr_multiplier * layer_decay ** (n + 1 - layer_id(backbone, name))
    return scales


def adapted_backbones(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name prefix in `model`, backbone) of every adapted backbone in `model` (a backbone itself: prefix "")."""
    return [(name + "." if name else "", module) for name, module in model.named_modules()
            if adaptation_of(module) is not None]


@contextlib.contextmanager
def lora_merged(model: nn.Module):
    """Within the block, every LoRA-adapted backbone of `model` is a plain frozen one, its adapters folded into
    its weights (`merge_lora`: what an export traces); on exit the adapters are put back unchanged. Yields the
    number of backbones merged."""
    swapped = []
    for _, backbone in adapted_backbones(model):
        adaptation = adaptation_of(backbone)
        if adaptation.mode != "lora":
            continue
        layers = [(name, module) for name, module in backbone.named_modules() if isinstance(module, LoRALinear)]
        merge_lora(backbone)
        swapped.append((backbone, adaptation, layers))
    try:
        yield len(swapped)
    finally:
        for backbone, adaptation, layers in swapped:
            for name, module in layers:
                parent_name, _, attr = name.rpartition(".")
                setattr(backbone.get_submodule(parent_name), attr, module)
            setattr(backbone, ADAPTATION, adaptation)
            freeze_backbone(backbone)


# -- identity of the base backbone ---------------------------------------------------------------------------------

def backbone_identity(backbone: nn.Module, dino_hub: str | None, pretrained_weights: str | None,
                      random_init_seed: int = 0) -> dict:
    """What an adapted checkpoint records of its base backbone: the hub name, the weights file (name and size; a
    Hugging Face directory: its name and the total size of its files) or the seed of random weights, and the
    architecture (class, depth, width, and a digest of every base tensor's name and shape)."""
    identity = {"dino_hub": dino_hub, "weights": None, "random_init_seed": None,
                "architecture": _architecture(backbone)}
    if pretrained_weights:
        identity["weights"] = _weights_file(dino_hub, pretrained_weights)
    else:
        identity["random_init_seed"] = random_init_seed
    return identity


def _architecture(backbone: nn.Module) -> dict:
    adapted = set(adapted_names(backbone))
    shapes = sorted(f"{k}:{tuple(v.shape)}" for k, v in backbone.state_dict().items() if k not in adapted)
    digest = hashlib.sha256("\n".join(shapes).encode()).hexdigest()[:16]
    return {"class": type(backbone).__name__, "layers": n_layers(backbone), "embed_dim": backbone.embed_dim,
            "tensors": digest}


def _weights_file(dino_hub: str | None, weights: str) -> dict:
    path = resolve_weights_path(_weights_location(dino_hub, weights) if dino_hub else weights)
    if path.is_dir():
        size = sum(f.stat().st_size for f in sorted(path.iterdir()) if f.is_file())
    else:
        size = path.stat().st_size
    return {"file": Path(path).name, "bytes": size}


def _describe(field: str, value) -> str:
    if field == "weights":
        return "random weights" if value is None else f"{value['file']} ({value['bytes']} bytes)"
    if field == "architecture":
        return (f"{value['class']} with {value['layers']} layers of width {value['embed_dim']} "
                f"(tensor shapes {value['tensors']})")
    if field == "random_init_seed":
        return "pretrained weights" if value is None else f"random weights of seed {value}"
    return repr(value)


def check_backbone_identity(recorded: dict, current: dict, source: str) -> None:
    """Refuse (one line, `BackboneMismatchError`) adapted tensors recorded for another backbone than `current`."""
    if not isinstance(recorded, dict) or set(recorded) != set(current):
        raise BackboneMismatchError(f"{source}: no readable backbone identity; it cannot be checked against this "
                                    f"run's backbone")
    for field in ("dino_hub", "weights", "random_init_seed", "architecture"):
        if recorded[field] != current[field]:
            raise BackboneMismatchError(
                f"{source}: adapted on another backbone ({field}: {_describe(field, recorded[field])} in the "
                f"checkpoint, {_describe(field, current[field])} here); adapted tensors only apply to their own "
                f"base backbone"
            )


# -- what a head checkpoint records of its adapted backbone --------------------------------------------------------

RECORD = "backbone"  # the entry of a head checkpoint that records its adapted backbone
_SETTINGS_TO_KWARGS = {"mode": "mode", "last_read_block": "last_read_block", "lora_rank": "rank", "lora_alpha": "alpha",
                       "lora_targets": "targets", "blocks": "blocks", "gradient_checkpointing": "gradient_checkpointing"}


def adaptation_record(model: nn.Module) -> dict | None:
    """What a head checkpoint of `model` records of its adapted backbone: ``{"identity": backbone_identity,
    "finetune": the settings it was adapted with}``; None when no backbone of `model` is adapted (a checkpoint of
    a frozen backbone stays as it always was)."""
    backbones = adapted_backbones(model)
    if not backbones:
        return None
    if len(backbones) > 1:
        raise ValueError(f"adaptation_record: {len(backbones)} adapted backbones in one model; a checkpoint records one")
    adaptation = adaptation_of(backbones[0][1])
    return {"identity": adaptation.identity, "finetune": dict(adaptation.settings)}


def _check_record(record, source: str) -> None:
    settings = record.get("finetune") if isinstance(record, dict) else None
    if (not isinstance(record.get("identity") if isinstance(record, dict) else None, dict)
            or not isinstance(settings, dict) or settings.get("mode") not in MODES[1:]
            or not set(settings) <= set(_SETTINGS_TO_KWARGS)):
        raise CheckpointError(f"{source}: its record of the adapted backbone ('{RECORD}') is not readable; the "
                              f"adapted tensors cannot be applied")


def read_adaptation_record(path: str | Path) -> dict | None:
    """The adapted backbone a dinoseg head checkpoint records (`adaptation_record`); None for a checkpoint of a
    frozen backbone and for head files that are not ours (official or released heads, safetensors)."""
    obj = read_checkpoint_object(path)
    record = obj.get(RECORD) if isinstance(obj, dict) else None
    if record is None:
        return None
    _check_record(record, str(path))
    return record


def adapt_as_recorded(backbone: nn.Module, record: dict | None, identity: dict, source: str) -> nn.Module:
    """Adapt `backbone` (built, its weights loaded) as the head checkpoint `source` records (`record`, from
    `read_adaptation_record`), so that the checkpoint's adapted tensors load into it; `identity` is this backbone's
    `backbone_identity`, which must be the recorded one (`BackboneMismatchError`, one line). None: `backbone`
    unchanged (a head trained on a frozen backbone)."""
    if record is None:
        return backbone
    _check_record(record, source)
    check_backbone_identity(record["identity"], identity, source)
    kwargs = {_SETTINGS_TO_KWARGS[k]: v for k, v in record["finetune"].items()}
    try:
        return adapt_backbone(backbone, **kwargs, identity=identity)
    except FinetuneError as e:
        raise BackboneMismatchError(f"{source}: its adapted backbone cannot be rebuilt on this one ({e})") from None


def check_adaptation_record(recorded: dict | None, model: nn.Module, source: str) -> None:
    """A training checkpoint's record (None: frozen) against the model it resumes into: the same adaptation of the
    same base backbone, else `BackboneMismatchError` (one line)."""
    current = adaptation_record(model)
    if recorded is None or current is None:
        if recorded is not current:
            held = "an adapted backbone's tensors" if recorded is not None else "a head trained on a frozen backbone"
            raise BackboneMismatchError(f"{source}: holds {held}, but this run's backbone is "
                                        f"{'adapted' if current is not None else 'frozen'}")
        return
    _check_record(recorded, source)
    check_backbone_identity(recorded["identity"], current["identity"], source)
    if recorded["finetune"] != current["finetune"]:
        raise BackboneMismatchError(f"{source}: adapted with {recorded['finetune']}, this run's backbone with "
                                    f"{current['finetune']}")


def adapt_for_head_file(backbone: nn.Module, head: str | Path, dino_hub: str | None, weights) -> nn.Module:
    """`adapt_as_recorded` with the record of the head file `head` (if any) and the identity of `backbone`, a hub
    backbone `dino_hub` loaded from `weights` (a path, URL or `Weights` member): what the hub loaders do with a
    head checkpoint of a local run."""
    record = read_adaptation_record(head)
    if record is None:
        return backbone
    return adapt_as_recorded(backbone, record, backbone_identity(backbone, dino_hub, weights), str(head))
