"""Backbone adaptation (dinoseg.models.finetune, layers.lora, the adapted-backbone rules of models.frozen) and the
stochastic depth / gradient checkpointing of the backbone blocks."""

import copy
import json

import pytest
import torch
from torch import nn

from dinoseg import ConvNeXt, DinoVisionTransformer
from dinoseg.engine.optim import build_optimizer
from dinoseg.layers import LinearKMaskedBias
from dinoseg.layers.drop_path import DropPath, drop_path
from dinoseg.layers.lora import LoRALinear
from dinoseg.models.checkpoint import CheckpointError, load_head_state_dict
from dinoseg.models.finetune import (
    BackboneMismatchError,
    FinetuneError,
    adapt_backbone,
    adapted_names,
    adapted_state_dict,
    backbone_identity,
    check_backbone_identity,
    layer_id,
    load_adapted_state_dict,
    merge_lora,
    param_groups,
)
from dinoseg.models.frozen import (
    adaptation_of,
    backbone_trains,
    freeze_backbone,
    frozen_names,
    frozen_prefixes,
    head_state_dict,
    set_train_mode,
)
from dinoseg.models.precision import cast_weights

from .conftest import FIXTURES, load_fixture

VIT_MLP, VIT_SWIGLU = "backbone_vit_mlp.pt", "backbone_vit_swiglu_untied.pt"
CONVNEXT = "convnext/backbone_convnext_a.pt"
LORA_ALL = {VIT_MLP: ["qkv", "proj", "fc1", "fc2"], VIT_SWIGLU: ["qkv", "proj", "w1", "w2", "w3"],
            CONVNEXT: ["pwconv1", "pwconv2"]}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def official(name: str, **overrides) -> tuple[nn.Module, dict]:
    """The fixture's backbone, loaded strictly from its official state dict, and its reference file."""
    ref = load_fixture(name)
    if name == CONVNEXT:
        kwargs = json.loads((FIXTURES / "convnext" / "index.json").read_text())["backbone_convnext_a.pt"]["official_kwargs"]
        model = ConvNeXt(**{**kwargs, **overrides})
    else:
        model = DinoVisionTransformer(**{**json.loads((FIXTURES / "index.json").read_text())[name]["official_kwargs"],
                                         **overrides})
    model.load_state_dict(ref["state_dict"], strict=True)
    return model.eval(), ref


def image(name: str, ref: dict) -> torch.Tensor:
    return ref["x"][0] if name == CONVNEXT else ref["x"]


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    features = model.forward_features(x)
    layers = model.get_intermediate_layers(x, n=4, reshape=True, return_class_token=True)
    return [features["x_norm_clstoken"], features["x_norm_patchtokens"]] + [t for pair in layers for t in pair]


def randomize_lora_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


class TinyModel(nn.Module):
    """A frozen (possibly adapted) backbone and a linear head on its last layer."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = freeze_backbone(backbone)
        dim = backbone.embed_dim
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        grad = torch.enable_grad() if backbone_trains(self.backbone) else torch.no_grad()
        with grad:
            tokens = self.backbone.get_intermediate_layers(x, n=1)[0]
        return self.head(tokens).mean()


# -- frozen, LoRA at init, official keys ---------------------------------------------------------------------------

def test_frozen_mode_leaves_the_backbone_untouched():
    model, _ = official(VIT_MLP)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    assert adapt_backbone(model, "frozen", rank=0, targets=["nope"], blocks=99) is model  # nothing else is read
    assert adaptation_of(model) is None and [p.requires_grad for p in model.parameters()] == flags
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("name", [VIT_MLP, VIT_SWIGLU, CONVNEXT])
def test_lora_at_init_gives_the_frozen_outputs_exactly(name):
    frozen, ref = official(name)
    adapted = adapt_backbone(copy.deepcopy(frozen), "lora", rank=4, alpha=8, targets=LORA_ALL[name])
    x = image(name, ref)
    with torch.no_grad():
        for a, b in zip(outputs(adapted, x), outputs(frozen, x), strict=True):
            assert torch.equal(a, b)
    n_linear = sum(len(LORA_ALL[name]) for _ in range(frozen.n_blocks)) if name != CONVNEXT else 2 * 6
    assert sum(isinstance(m, LoRALinear) for m in adapted.modules()) == n_linear
    assert all(p.dtype == torch.float32 for n, p in adapted.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("name", [VIT_MLP, VIT_SWIGLU, CONVNEXT])
def test_official_checkpoints_load_strictly_into_an_adapted_backbone(name):
    model, ref = official(name)
    adapt_backbone(model, "lora", targets=LORA_ALL[name])
    base = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert list(base) == list(ref["state_dict"])  # official keys, in the official order
    randomize_lora_b(model)
    adapters = {k: v.clone() for k, v in adapted_state_dict(model).items()}
    sd = {k: v + 1 if v.is_floating_point() and k.endswith("weight") else v for k, v in ref["state_dict"].items()}
    model.load_state_dict(sd, strict=True)  # a base checkpoint: the adapters keep their values
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert all(torch.equal(adapted_state_dict(model)[k], v) for k, v in adapters.items())
    # A state dict with some adapters must hold them all.
    partial = {**ref["state_dict"], **dict(list(adapters.items())[:1])}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*lora_"):
        model.load_state_dict(partial, strict=True)
    # Adapters never load into an unadapted backbone.
    plain, _ = official(name)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*lora_A"):
        plain.load_state_dict(model.state_dict(), strict=True)


def test_masked_k_bias_is_kept_by_lora():
    model, ref = official(VIT_MLP)
    adapt_backbone(model, "lora", targets=["qkv"])
    qkv = model.blocks[0].attn.qkv
    assert qkv.base_class is LinearKMaskedBias and torch.equal(qkv.bias_mask, ref["state_dict"]["blocks.0.attn.qkv.bias_mask"])
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        bias = qkv.bias * qkv.bias_mask
        assert torch.equal(qkv(x), nn.functional.linear(x, qkv.weight, bias))


# -- merging -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [VIT_MLP, VIT_SWIGLU, CONVNEXT])
def test_merged_lora_equals_unmerged_and_is_an_official_backbone(name):
    model, ref = official(name)
    adapt_backbone(model, "lora", rank=4, alpha=16, targets=LORA_ALL[name])
    randomize_lora_b(model)
    x = image(name, ref)
    with torch.no_grad():
        unmerged = outputs(model, x)
        changed = outputs(official(name)[0], x)
        assert not torch.allclose(unmerged[1], changed[1], atol=1e-3)  # the adapters do act
        merge_lora(model)
        merged = outputs(model, x)
    for a, b in zip(merged, unmerged, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert adaptation_of(model) is None and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert list(model.state_dict()) == list(ref["state_dict"])
    assert not any(p.requires_grad for p in model.parameters())
    if name != CONVNEXT:
        assert type(model.blocks[0].attn.qkv) is LinearKMaskedBias
    plain, _ = official(name)
    plain.load_state_dict(model.state_dict(), strict=True)  # loads into the official architecture
    with torch.no_grad():
        torch.testing.assert_close(outputs(plain, x)[1], unmerged[1], atol=1e-5, rtol=1e-5)


# -- what trains ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["lora", "blocks"])
@pytest.mark.parametrize("name", [VIT_MLP, CONVNEXT])
def test_only_adapted_tensors_get_gradients_and_change_after_a_step(name, mode):
    backbone, ref = official(name)
    model = TinyModel(adapt_backbone(backbone, mode, blocks=1, targets=LORA_ALL[name] if mode == "lora" else None))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_train_mode(model)
    optimizer = build_optimizer(model, 1e-2, (0.9, 0.999), 1e-2, param_groups=param_groups(model, 1e-2))
    model(image(name, ref)[:, :, :64, :64]).backward()
    adapted = {"backbone." + n for n in adapted_names(model.backbone)}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == adapted | {"head.weight", "head.bias"}
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed - {"head.weight", "head.bias"} <= adapted
    assert any(k.endswith("lora_B") for k in changed) if mode == "lora" else changed - {"head.weight", "head.bias"}


def test_blocks_mode_trains_the_last_blocks_and_nothing_else():
    vit, _ = official(VIT_MLP)
    adapt_backbone(vit, "blocks", blocks=2)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in vit.named_parameters() if n.startswith(("blocks.2.", "blocks.3."))}
    assert set(adapted_names(vit)) == trainable and adaptation_of(vit).train_modules == ("blocks.2", "blocks.3")
    assert not vit.norm.weight.requires_grad  # the final norm stays frozen (read by every layer a head takes)

    convnext, _ = official(CONVNEXT)
    adapt_backbone(convnext, "blocks", blocks=1)
    trainable = {n for n, p in convnext.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in convnext.named_parameters()
                         if n.startswith(("stages.3.", "downsample_layers.3."))}
    assert not convnext.norm.weight.requires_grad

    # Counted back from the deepest block the head reads: blocks past it never run.
    vit, _ = official(VIT_MLP)
    adapt_backbone(vit, "blocks", blocks=2, last_read_block=2)
    assert adaptation_of(vit).train_modules == ("blocks.1", "blocks.2")


def test_lora_leaves_blocks_past_the_last_read_one_alone():
    vit, _ = official(VIT_MLP)
    adapt_backbone(vit, "lora", targets=["qkv"], last_read_block=1)
    assert adapted_names(vit) == ("blocks.0.attn.qkv.lora_A", "blocks.0.attn.qkv.lora_B",
                                  "blocks.1.attn.qkv.lora_A", "blocks.1.attn.qkv.lora_B")
    assert not isinstance(vit.blocks[2].attn.qkv, LoRALinear)


def test_lora_adapters_are_drawn_from_their_seed_only():
    backbone = official(VIT_MLP)[0]
    state = torch.get_rng_state()
    a = adapt_backbone(backbone, "lora", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = adapt_backbone(official(VIT_MLP)[0], "lora", seed=3)
    c = adapt_backbone(official(VIT_MLP)[0], "lora", seed=4)
    assert all(torch.equal(v, adapted_state_dict(b)[k]) for k, v in adapted_state_dict(a).items())
    assert not torch.equal(a.blocks[0].attn.qkv.lora_A, c.blocks[0].attn.qkv.lora_A)
    assert a.blocks[0].attn.qkv.lora_A.abs().max() <= 64 ** -0.5  # U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear


# -- frozen.py: checkpoints, DDP, training mode ----------------------------------------------------------------------

def test_fully_frozen_backbone_rules_are_unchanged():
    model = TinyModel(official(VIT_MLP)[0])
    prefixes = tuple(frozen_prefixes(model))
    assert prefixes == ("backbone.",)
    old_rule = {k for k in model.state_dict() if not k.startswith(prefixes)}
    assert list(head_state_dict(model)) == [k for k in model.state_dict() if k in old_rule] == ["head.weight", "head.bias"]
    old_ignored = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    old_ignored |= {n for n, _ in model.named_buffers() if n.startswith(prefixes)}
    assert old_ignored <= frozen_names(model)
    set_train_mode(model)
    assert model.training and model.head.training and not any(m.training for m in model.backbone.modules())


@pytest.mark.parametrize("mode", ["lora", "blocks"])
def test_adapted_backbone_checkpoint_holds_the_head_and_the_adapted_tensors_only(mode):
    model = TinyModel(adapt_backbone(official(VIT_MLP)[0], mode, blocks=1))
    adapted = ["backbone." + n for n in adapted_names(model.backbone)]
    saved = head_state_dict(model)
    assert set(saved) == set(adapted) | {"head.weight", "head.bias"}
    assert not set(saved) & frozen_names(model)
    assert "backbone.blocks.3.attn.qkv.bias_mask" not in saved  # a constant, not trained
    # DDP ignores exactly the frozen tensors: every parameter left over trains.
    params = {n for n, _ in model.named_parameters()}
    assert params - frozen_names(model) == {n for n, p in model.named_parameters() if p.requires_grad}
    # freeze_backbone again (heads call it on the backbone they are given) keeps the adaptation.
    freeze_backbone(model.backbone)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == params - frozen_names(model)


def test_head_checkpoint_of_an_adapted_model_loads_back_strictly():
    trained = TinyModel(adapt_backbone(official(VIT_MLP)[0], "lora"))
    randomize_lora_b(trained.backbone)
    saved = head_state_dict(trained)
    fresh = TinyModel(adapt_backbone(official(VIT_MLP)[0], "lora", seed=5))
    load_head_state_dict(fresh, saved, source="ckpt.pth")
    assert all(torch.equal(v, head_state_dict(fresh)[k]) for k, v in saved.items())
    incomplete = {k: v for k, v in saved.items() if k != "backbone.blocks.2.attn.proj.lora_A"}
    with pytest.raises(CheckpointError, match=r"^ckpt.pth: .*1 missing keys: backbone.blocks.2.attn.proj.lora_A$"):
        load_head_state_dict(fresh, incomplete, source="ckpt.pth")
    with pytest.raises(CheckpointError, match=r"^ckpt.pth: head checkpoint holds 1 backbone keys \(backbone.norm.weight\)"):
        load_head_state_dict(fresh, {**saved, "backbone.norm.weight": torch.ones(64)}, source="ckpt.pth")
    frozen = TinyModel(official(VIT_MLP)[0])
    with pytest.raises(CheckpointError, match=r"^ckpt.pth: head checkpoint holds 16 backbone keys"):
        load_head_state_dict(frozen, saved, source="ckpt.pth")


def test_ddp_over_the_adapted_tensors_needs_every_one_of_them_used(tmp_path):
    """DDP ignoring `frozen_names` syncs the head and the adapted tensors; a head that stops at an early block
    needs `last_read_block`, or the adapters past it get no gradient and DDP fails on the next step."""
    import torch.distributed as dist

    class EarlyHead(TinyModel):
        def forward(self, x):
            return self.head(self.backbone.get_intermediate_layers(x, n=[1])[0]).mean()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for last_read_block in (1, None):
            backbone, ref = official(VIT_MLP)
            model = EarlyHead(adapt_backbone(backbone, "lora", last_read_block=last_read_block))
            frozen = frozen_names(model)
            ignored = [n for n, _ in model.named_parameters() if n in frozen]
            ignored += [n for n, _ in model.named_buffers() if n in frozen]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
            ddp = nn.parallel.DistributedDataParallel(model)
            synced = {id(p) for p in ddp._module_parameters}
            assert synced == {id(p) for p in model.parameters() if p.requires_grad}
            set_train_mode(model)
            x = ref["x"][:1, :, :32, :32]
            ddp(x).backward()
            if last_read_block is None:
                with pytest.raises(RuntimeError, match="parameters that were not used"):
                    ddp(x).backward()
            else:
                ddp(x).backward()
    finally:
        dist.destroy_process_group()


def test_train_mode_reaches_the_blocks_that_train_only():
    model = TinyModel(adapt_backbone(official(VIT_MLP)[0], "blocks", blocks=2))
    set_train_mode(model)
    in_train = {n for n, m in model.backbone.named_modules() if m.training}
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in in_train} == {"blocks.2", "blocks.3"}
    assert not model.backbone.training and not model.backbone.rope_embed.training
    set_train_mode(model, False)
    assert not any(m.training for m in model.modules())


# -- adapted state dicts, parameter groups --------------------------------------------------------------------------

def test_adapted_state_dict_round_trips_strictly():
    trained = adapt_backbone(official(VIT_SWIGLU)[0], "lora", targets=["qkv", "w3"])
    randomize_lora_b(trained)
    saved = adapted_state_dict(trained)
    fresh = adapt_backbone(official(VIT_SWIGLU)[0], "lora", targets=["qkv", "w3"])
    load_adapted_state_dict(fresh, saved, source="run/checkpoint.pth")
    assert all(torch.equal(adapted_state_dict(fresh)[k], v) for k, v in saved.items())
    missing = dict(saved)
    del missing["blocks.1.mlp.w3.lora_B"]
    with pytest.raises(CheckpointError, match=r"^run/checkpoint.pth: .*1 missing keys: blocks.1.mlp.w3.lora_B$"):
        load_adapted_state_dict(fresh, missing, source="run/checkpoint.pth")
    other = adapt_backbone(official(VIT_SWIGLU)[0], "lora", targets=["qkv"])
    with pytest.raises(CheckpointError, match="unexpected keys: blocks.0.mlp.w3.lora_A"):
        load_adapted_state_dict(other, saved, source="run/checkpoint.pth")
    smaller = adapt_backbone(official(VIT_SWIGLU)[0], "lora", rank=2, targets=["qkv", "w3"])
    with pytest.raises(CheckpointError, match=r"shape mismatches: blocks.0.attn.qkv.lora_A \(8, 64\) vs \(2, 64\)"):
        load_adapted_state_dict(smaller, saved, source="run/checkpoint.pth")


def test_layer_ids_follow_the_beit_convention():
    vit, convnext = official(VIT_MLP)[0], official(CONVNEXT)[0]
    assert [layer_id(vit, n) for n in ("patch_embed.proj.weight", "cls_token", "storage_tokens", "blocks.0.ls1.gamma",
                                       "blocks.3.attn.qkv.lora_A", "norm.weight")] == [0, 0, 0, 1, 4, 5]
    assert [layer_id(convnext, n) for n in ("downsample_layers.0.0.weight", "stages.0.0.gamma",
                                            "downsample_layers.1.1.weight", "stages.3.0.pwconv1.lora_B",
                                            "norm.weight", "norms.3.bias")] == [0, 1, 2, 4, 5, 5]


def test_param_groups_scale_the_backbone_lr_per_layer():
    frozen = TinyModel(official(VIT_MLP)[0])
    groups = param_groups(frozen, 0.05)
    assert len(groups) == 1 and groups[0]["lr_scale"] == 1.0 and groups[0]["weight_decay"] == 0.05
    assert groups[0]["params"] == [p for p in frozen.parameters() if p.requires_grad]

    model = TinyModel(adapt_backbone(official(VIT_MLP)[0], "blocks", blocks=2))
    groups = param_groups(model, 0.05, lr_multiplier=0.1, layer_decay=0.5)
    assert groups[0]["params"] == [model.head.weight, model.head.bias] and groups[0]["lr_scale"] == 1.0
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in groups[1:]:
        for p in group["params"]:
            name = names[id(p)]
            depth = int(name.split(".")[2]) + 1  # backbone.blocks.<i>.
            assert group["lr_scale"] == pytest.approx(0.1 * 0.5 ** (4 + 1 - depth)), name
            assert group["weight_decay"] == (0.05 if p.ndim >= 2 else 0.0), name
            seen.append(name)
    assert sorted(seen) == sorted("backbone." + n for n in adapted_names(model.backbone))
    with pytest.raises(FinetuneError, match=r"^model.finetune.layer_decay=1.5: must be a number in \(0, 1\]$"):
        param_groups(model, 0.05, layer_decay=1.5)
    with pytest.raises(FinetuneError, match=r"^model.finetune.lr_multiplier=0: must be a number > 0$"):
        param_groups(model, 0.05, lr_multiplier=0)


def test_param_groups_earlier_call_form_still_works_with_a_deprecation_warning():
    model = TinyModel(adapt_backbone(official(VIT_MLP)[0], "blocks", blocks=2))
    current = param_groups(model, 0.05, layer_decay=0.5)
    for call in (lambda: param_groups(model, 1e-3, 0.05, layer_decay=0.5),
                 lambda: param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)):
        with pytest.warns(DeprecationWarning, match=r"param_groups\(model, weight_decay\)"):
            groups = call()
        assert [g["params"] for g in groups] == [g["params"] for g in current]
        assert [g["weight_decay"] for g in groups] == [g["weight_decay"] for g in current]
        assert [g["lr"] for g in groups] == [1e-3 * g["lr_scale"] for g in current]


# -- precision, drop path, gradient checkpointing ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["lora", "blocks"])
def test_half_base_weights_keep_float32_adapted_tensors(mode):
    model, ref = official(VIT_MLP)
    cast_weights(model, torch.bfloat16)
    adapt_backbone(model, mode, blocks=1)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    set_train_mode(model)
    model.get_intermediate_layers(ref["x"][:1, :, :32, :32], n=1)[0].float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_drop_path_is_a_no_op_in_eval_mode_and_acts_in_training_mode():
    for name in (VIT_MLP, CONVNEXT):
        plain, ref = official(name)
        dropped, _ = official(name, drop_path_rate=0.5)
        x = image(name, ref)
        with torch.no_grad():
            for a, b in zip(outputs(dropped, x), outputs(plain, x), strict=True):
                assert torch.equal(a, b)
            torch.manual_seed(0)
            trained = dropped.train().forward_features(x)["x_norm_patchtokens"]
        assert not torch.allclose(trained, plain.forward_features(x)["x_norm_patchtokens"], atol=1e-4)
    # Official schedules: one rate in every ViT block, rising linearly over the ConvNeXt blocks.
    vit = DinoVisionTransformer(embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.2, device="meta")
    assert [b.sample_drop_ratio for b in vit.blocks] == [0.2] * 3
    convnext = ConvNeXt(depths=[1, 1, 2, 1], dims=[8, 8, 8, 8], drop_path_rate=0.2, device="meta")
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for s in convnext.stages for b in s]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.5"):
        DinoVisionTransformer(drop_path_rate=1.5, device="meta")


def test_drop_path_drops_whole_samples():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 4, 4) + 5
    out = drop_path(x, 0.25, training=True)
    kept = [torch.equal(o, xi / 0.75) for o, xi in zip(out, x)]
    dropped = [bool((o == 0).all()) for o in out]
    assert all(k != d for k, d in zip(kept, dropped)) and 0 < sum(dropped) < 64
    assert torch.equal(drop_path(x, 0.25, training=False), x)


def test_vit_stochastic_depth_runs_the_branch_on_a_subset_of_the_batch():
    block = DinoVisionTransformer(embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.5, layerscale_init=1.0).blocks[0]
    x = torch.randn(4, 6, 32)
    calls = []
    block.attn.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    block.train()(x)
    assert calls == [2]  # max(int(4 * (1 - 0.5)), 1) samples
    block.eval()(x)
    assert calls == [2, 4]


@pytest.mark.parametrize("name,mode", [(VIT_MLP, "blocks"), (VIT_MLP, "lora"), (CONVNEXT, "blocks")])
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(name, mode):
    results = []
    for checkpointing in (False, True):
        backbone, ref = official(name, drop_path_rate=0.3)
        torch.manual_seed(0)  # the head's initial weights
        model = TinyModel(adapt_backbone(backbone, mode, blocks=2, gradient_checkpointing=checkpointing))
        set_train_mode(model)
        recomputed = []

        def counted(forward, calls=recomputed):
            return lambda *args: (calls.append(1), forward(*args))[1]

        for block in model.backbone.modules():
            if getattr(block, "gradient_checkpointing", False):
                block._forward = counted(block._forward)
        torch.manual_seed(0)  # same drop-path draws
        loss = model(image(name, ref)[:, :, :64, :64])
        n_forward = len(recomputed)
        loss.backward()
        assert (len(recomputed) > n_forward) == checkpointing  # activations recomputed in the backward pass
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], atol=1e-6, rtol=1e-5, msg=key)


# -- backbone identity ----------------------------------------------------------------------------------------------

def test_backbone_identity_refuses_another_backbone_in_one_line(tmp_path):
    model, ref = official(VIT_MLP)
    weights = tmp_path / "vit_mlp.pth"
    torch.save(ref["state_dict"], weights)
    adapted = adapt_backbone(copy.deepcopy(model), "lora")
    identity = backbone_identity(adapted, None, str(weights))
    assert identity == backbone_identity(model, None, str(weights))  # the adapters are no part of it
    assert identity["weights"] == {"file": "vit_mlp.pth", "bytes": weights.stat().st_size}
    check_backbone_identity(identity, backbone_identity(model, None, str(weights)), "ckpt.pth")

    other = tmp_path / "other.pth"
    torch.save({k: v.clone() for k, v in list(ref["state_dict"].items())[:-1]}, other)
    cases = [
        (backbone_identity(model, None, str(other)), "weights: vit_mlp.pth"),
        (backbone_identity(model, None, None, random_init_seed=0), "weights: vit_mlp.pth .* random weights here"),
        (backbone_identity(official(VIT_SWIGLU)[0], None, str(weights)), "architecture: DinoVisionTransformer"),
        ({**identity, "dino_hub": "dinov3_vits16"}, "dino_hub: None in the checkpoint, 'dinov3_vits16' here"),
    ]
    for current, message in cases:
        with pytest.raises(BackboneMismatchError, match=f"^ckpt.pth: adapted on another backbone \\({message}") as e:
            check_backbone_identity(identity, current, "ckpt.pth")
        assert "\n" not in str(e.value) and isinstance(e.value, CheckpointError)
    seeded = backbone_identity(model, None, None, random_init_seed=0)
    with pytest.raises(BackboneMismatchError, match="random weights of seed 0 in the checkpoint, random weights of seed 1"):
        check_backbone_identity(seeded, backbone_identity(model, None, None, random_init_seed=1), "ckpt.pth")
    with pytest.raises(BackboneMismatchError, match="no readable backbone identity"):
        check_backbone_identity({"hub": 1}, identity, "ckpt.pth")


# -- errors -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs,message", [
    (VIT_MLP, dict(mode="full"), r"mode='full': expected one of frozen, lora, blocks"),
    (VIT_MLP, dict(mode="lora", rank=0), r"lora_rank=0: must be an integer >= 1"),
    (VIT_MLP, dict(mode="lora", rank=2.5), r"lora_rank=2.5: must be an integer >= 1"),
    (VIT_MLP, dict(mode="lora", alpha=0), r"lora_alpha=0: must be a number > 0"),
    (VIT_MLP, dict(mode="lora", targets=["qkv", "nope"]),
     r"lora_targets=\['qkv', 'nope'\]: 'nope' matches no linear layer of this DinoVisionTransformer's blocks; "
     r"they are fc1, fc2, proj, qkv"),
    (VIT_MLP, dict(mode="lora", targets=["w1"]), r"lora_targets=\['w1'\]: 'w1' matches no linear layer .* fc1, fc2, proj, qkv"),
    (VIT_MLP, dict(mode="lora", targets=[]),
     r"lora_targets=\[\]: expected a non-empty list of layer names among \['fc1', 'fc2', 'proj', 'qkv'\]"),
    (VIT_MLP, dict(mode="lora", targets="qkv"), r"lora_targets='qkv': expected a non-empty list of layer names among .*"),
    (VIT_MLP, dict(mode="lora", targets=["qkv", "qkv"]), r"lora_targets=\['qkv', 'qkv'\]: lists a layer twice"),
    (CONVNEXT, dict(mode="lora", targets=["qkv", "proj"]),
     r"lora_targets=\['qkv', 'proj'\]: 'qkv' matches no linear layer of this ConvNeXt's blocks; they are pwconv1, pwconv2"),
    (VIT_MLP, dict(mode="blocks", blocks=5), r"blocks=5: must be an integer in \[1, 4\]: this backbone has 4 blocks"),
    (VIT_MLP, dict(mode="blocks", blocks=3, last_read_block=1),
     r"blocks=3: must be an integer in \[1, 2\]: this backbone has 4 blocks \(the head reads up to block 1\)"),
    (CONVNEXT, dict(mode="blocks", blocks=0), r"blocks=0: must be an integer in \[1, 4\]: this backbone has 4 stages"),
    (VIT_MLP, dict(mode="lora", last_read_block=4), r"last_read_block=4: must be an integer in \[0, 3\]"),
])
def test_wrong_values_are_one_line_errors_naming_the_key(name, kwargs, message):
    model, _ = official(name)
    mode = kwargs.pop("mode")
    with pytest.raises(FinetuneError, match=f"^model.finetune.{message}$") as e:
        adapt_backbone(model, mode, **kwargs)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    assert adaptation_of(model) is None and not any(isinstance(m, LoRALinear) for m in model.modules())


def test_adapting_twice_or_on_the_meta_device_is_refused():
    model = adapt_backbone(official(VIT_MLP)[0], "lora")
    with pytest.raises(FinetuneError, match=r"^model.finetune.mode='blocks': this backbone is already adapted \(lora\)$"):
        adapt_backbone(model, "blocks")
    with pytest.raises(ValueError, match="load the backbone's weights first"):
        adapt_backbone(DinoVisionTransformer(embed_dim=32, depth=2, num_heads=2, device="meta"), "lora")
    with pytest.raises(FinetuneError, match="adapts a DinoVisionTransformer or ConvNeXt, not a Linear"):
        adapt_backbone(nn.Linear(2, 2), "lora")
