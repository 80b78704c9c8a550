"""Backbone adaptation through the engine (`model.finetune`, issue 22), for segmentation (linear, Mask2Former), depth
and detection: `frozen` trains exactly as before, LoRA at initialisation is the frozen model, only the adapted tensors
train, checkpoints hold the head and the adapted tensors with the base backbone's identity, eval / predict / export /
the hub rebuild the adapted backbone (and refuse another backbone in one line), exact resume, DDP over what trains,
one-line errors. The effect of each `model.finetune` field: tests/test_config_effects.py."""

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoseg.cli import main
from dinoseg.engine.checkpoint import LAST
from dinoseg.engine.export import MERGE_TOLERANCE, merged_lora
from dinoseg.layers.lora import LoRALinear
from dinoseg.models.backbones import build_backbone
from dinoseg.models.finetune import RECORD, adapted_names
from dinoseg.models.frozen import adaptation_of, frozen_names, set_train_mode

from ._depth_run import TINY_DEPTH, tiny_depth
from ._detection_run import tiny_detection, write_coco_folders
from .engine_utils import REPO, TINY, TORCHRUN, assert_same_head, cli_env, kill_and_resume, read_checkpoint, tiny


def tiny_kwargs() -> dict:
    """The tiny test ViT's `model.backbone_kwargs` (engine_utils.TINY), typed."""
    from omegaconf import OmegaConf

    items = [item.removeprefix("model.backbone_kwargs.") for item in TINY if item.startswith("model.backbone_kwargs.")]
    return OmegaConf.to_container(OmegaConf.from_dotlist(items))


def weights_file(path: Path, hub: str | None = None) -> Path:
    """The tiny test ViT (a hub architecture with its keywords when `hub`) saved as a weights file, its layer scales
    raised to 0.5 (a trained backbone's order of magnitude: at the random 1e-5 the blocks barely change the
    features, nor would their adapters)."""
    backbone = build_backbone(hub, None, tiny_kwargs(), random_init=True)
    torch.save({k: (torch.full_like(v, 0.5) if k.endswith(".gamma") else v) for k, v in backbone.state_dict().items()},
               path)
    return path


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def error_of(capsys, args, code=2) -> str:
    got = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "dinoseg: error:" in line or "Traceback" in line]
    assert got == code, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("dinoseg: error: "), err[-2000:]
    return lines[0]


def snapshot(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def last_val(out) -> dict:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in line][-1]["val"]


def randomize_lora_b(model, scale=0.2) -> None:
    """Adapters far from their zero start, so that LoRA visibly changes the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)


# -- segmentation: a backbone from a weights file, trained frozen (mode omitted / said) and with LoRA --------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return str(weights_file(tmp_path_factory.mktemp("weights") / "tiny_vit.pth"))


def seg_args(out, weights, *extra, total_iter=10, checkpoint_interval=5):
    return ["train", *tiny(out, total_iter=total_iter, checkpoint_interval=checkpoint_interval,
                           extra=["model.random_init=false", f"model.pretrained_weights={weights}", *extra])]


@pytest.fixture(scope="module")
def seg_runs(tmp_path_factory, weights) -> dict:
    """Finished 10-iteration segmentation runs on the weights file: `omitted` (no finetune key: today's run),
    `frozen` (mode said, the other finetune keys changed: they have no effect), `lora`."""
    root = tmp_path_factory.mktemp("seg")
    runs = {
        "omitted": [],
        "frozen": ["model.finetune.mode=frozen", "model.finetune.lora_rank=2", "model.finetune.blocks=1",
                   "model.finetune.lr_multiplier=0.5", "model.finetune.layer_decay=0.5"],
        "lora": ["model.finetune.mode=lora"],
    }
    for name, extra in runs.items():
        assert main(seg_args(root / name, weights, *extra)) == 0
    return {name: root / name for name in runs}


def test_frozen_mode_trains_exactly_as_a_run_without_it(seg_runs):
    omitted, frozen = read_checkpoint(seg_runs["omitted"] / LAST), read_checkpoint(seg_runs["frozen"] / LAST)
    assert_same_head(omitted, frozen, 10)
    for a, b in ((omitted, frozen),):
        assert RECORD not in a and RECORD not in b  # a frozen checkpoint is what it always was
        assert len(a["optimizer"]["param_groups"]) == 1 and a["optimizer"]["param_groups"][0]["lr_scale"] == 1.0
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        for key, state in a["optimizer"]["state"].items():
            assert all(torch.equal(v, b["optimizer"]["state"][key][k]) for k, v in state.items())
    assert last_val(seg_runs["omitted"]) == last_val(seg_runs["frozen"])


def test_lora_checkpoint_holds_the_head_the_adapters_and_the_base_backbone(seg_runs, weights):
    from dinoseg.eval.segmentation.config import load_config
    from dinoseg.eval.segmentation.setup import build_model

    frozen, lora = read_checkpoint(seg_runs["omitted"] / LAST), read_checkpoint(seg_runs["lora"] / LAST)
    model = build_model(load_config([str(seg_runs["lora"] / "segmentation_config.yaml")]), num_classes=6)
    prefix = "segmentation_model.0.feature_model."
    adapters = {prefix + n for n in adapted_names(model.segmentation_model[0].feature_model)}
    assert len(adapters) == 4 * 2 * 2 and all(n.endswith(("lora_A", "lora_B")) for n in adapters)  # blocks x qkv, proj
    assert set(lora["model"]) == set(frozen["model"]) | adapters
    assert not set(lora["model"]) & frozen_names(model)  # no frozen weight
    assert any(lora["model"][n].abs().max() > 0 for n in adapters if n.endswith("lora_B"))  # they trained
    record = lora[RECORD]
    assert record["finetune"] == {"mode": "lora", "last_read_block": 3, "lora_rank": 8, "lora_alpha": 16.0,
                                  "lora_targets": ["qkv", "proj"], "gradient_checkpointing": False}
    assert record["identity"]["weights"] == {"file": "tiny_vit.pth", "bytes": Path(weights).stat().st_size}
    assert record["identity"]["dino_hub"] is None and record["identity"]["random_init_seed"] is None
    # The backbone trains at lr_multiplier x the head's lr, without weight decay on its 1-D tensors (none in LoRA).
    assert [(g["lr_scale"], g["weight_decay"]) for g in lora["optimizer"]["param_groups"]] == [(1.0, 1e-3), (0.1, 1e-3)]
    # Small: the adapters are a fraction of the backbone they adapt.
    adapter_bytes = sum(lora["model"][n].numel() * 4 for n in adapters)
    backbone_bytes = sum(t.numel() * 4 for t in torch.load(weights, weights_only=True).values())
    assert adapter_bytes < backbone_bytes / 3


def test_eval_of_an_adapted_checkpoint_reproduces_the_runs_last_validation(seg_runs, caplog):
    out = seg_runs["lora"]
    before = snapshot(out)
    with caplog.at_level(logging.INFO, logger="dinoseg"):
        assert main(["eval", str(out / "segmentation_config.yaml"), f"head={out / LAST}"]) == 0
    assert f"{out / LAST}: backbone adapted as it was trained (mode=lora, last_read_block=3, lora_rank=8" in caplog.text
    evaluated = json.loads((out / "eval" / "checkpoint_last" / "results-semantic-segmentation.json").read_text())
    assert evaluated["mIoU"] == last_val(out)["mIoU"] != last_val(seg_runs["omitted"])["mIoU"]
    assert {k: v for k, v in snapshot(out).items() if not k.startswith("eval/")} == before
    # The checkpoint decides: a config without model.finetune (the frozen run's) rebuilds the same adapted model.
    assert main(["eval", str(seg_runs["omitted"] / "segmentation_config.yaml"), f"head={out / LAST}",
                 f"output_dir={out / 'again'}"]) == 0
    again = json.loads((out / "again" / "eval" / "checkpoint_last" / "results-semantic-segmentation.json").read_text())
    assert again["mIoU"] == evaluated["mIoU"]


def test_an_adapted_checkpoint_on_another_backbone_is_refused_in_one_line(seg_runs, weights, tmp_path, capsys):
    out = seg_runs["lora"]
    other = tmp_path / "other_vit.pth"
    shutil.copy(weights, other)
    size = other.stat().st_size
    config, head = str(out / "segmentation_config.yaml"), f"head={out / LAST}"
    line = error_of(capsys, ["eval", config, head, f"model.pretrained_weights={other}", f"output_dir={tmp_path / 'e1'}"])
    assert line == (f"dinoseg: error: {out / LAST}: adapted on another backbone (weights: tiny_vit.pth ({size} bytes) in "
                    f"the checkpoint, other_vit.pth ({size} bytes) here); adapted tensors only apply to their own base "
                    "backbone")
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "images" / "a.png")
    assert main(["predict", config, head, "-i", str(tmp_path / "images"), "-o", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "a_label.png").exists()  # on its own backbone, predict runs
    line = error_of(capsys, ["predict", config, head, "model.pretrained_weights=null", "model.random_init=true",
                             "-i", str(tmp_path / "images"), "-o", str(tmp_path / "pred")])
    assert "adapted on another backbone (weights: tiny_vit.pth" in line and "random weights here" in line
    assert not (tmp_path / "e1").exists() and not (tmp_path / "pred").exists()


def test_a_resume_that_changes_model_finetune_or_the_base_backbone_is_refused(seg_runs, weights, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(seg_runs["lora"], out)
    before = snapshot(out)
    line = error_of(capsys, seg_args(out, weights, "model.finetune.mode=lora", "model.finetune.lora_rank=4",
                                     "train.resume=true", "scheduler.total_iter=12"))
    assert "model.finetune.lora_rank: 8 in the checkpoint, 4 now" in line
    line = error_of(capsys, seg_args(out, weights, "model.finetune.mode=blocks", "train.resume=true"))
    assert "model.finetune.mode: 'LORA' in the checkpoint, 'BLOCKS' now" in line
    # The same config on a base backbone that is no longer the one recorded (the weights file replaced in place).
    checkpoint = read_checkpoint(out / LAST)
    checkpoint[RECORD]["identity"]["weights"]["bytes"] += 1
    torch.save(checkpoint, out / LAST)
    before = snapshot(out)
    line = error_of(capsys, seg_args(out, weights, "model.finetune.mode=lora", "train.resume=true",
                                     "scheduler.total_iter=12"))
    assert f"{out / LAST}: adapted on another backbone (weights: tiny_vit.pth" in line
    assert snapshot(out) == before


def test_export_merges_lora_into_the_weights_equal_to_the_unmerged_model(seg_runs, tmp_path, caplog):
    import onnxruntime as ort

    from dinoseg.eval.segmentation.config import load_config
    from dinoseg.eval.segmentation.export import deployment_metadata, export_onnx
    from dinoseg.eval.segmentation.run import load_segmentor

    out = seg_runs["lora"]
    cfg = load_config([str(out / "segmentation_config.yaml")], [f"head={out / LAST}"])
    model, _ = load_segmentor(cfg, torch.device("cpu"))
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model.predict(x, rescale_to=(48, 48))
        randomize_lora_b(model)
        unmerged = model.predict(x, rescale_to=(48, 48))
        assert (unmerged - trained).abs().max() > 1e-2 * unmerged.abs().max()  # the adapters matter
        with merged_lora(model, x, ["scores"]) as difference:
            assert adaptation_of(model.segmentation_model[0].feature_model) is None
            assert not any(isinstance(m, LoRALinear) for m in model.modules())
            merged = model.predict(x, rescale_to=(48, 48))
        assert difference <= MERGE_TOLERANCE
        assert (merged - unmerged).abs().max() / unmerged.abs().max() <= MERGE_TOLERANCE
        assert torch.equal(model.predict(x, rescale_to=(48, 48)), unmerged)  # put back as it was
    # Through ONNX: one plain graph, the official backbone keys, the unmerged model's scores.
    with caplog.at_level(logging.INFO, logger="dinoseg"):
        path = export_onnx(model, tmp_path / "lora.onnx", image_size=(48, 48),
                           metadata=deployment_metadata(crop_size=48, stride=32, resize_short_side=64))
    report = next(r.export_report for r in caplog.records if hasattr(r, "export_report"))
    assert report.merge_difference is not None and report.merge_difference <= MERGE_TOLERANCE
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores = session.run(["class_scores"], {"image": x.numpy()})[0]
    assert np.abs(scores - unmerged.numpy()).max() / np.abs(unmerged.numpy()).max() < 1e-4
    assert isinstance(model.segmentation_model[0].feature_model.blocks[0].attn.qkv, LoRALinear)


@pytest.mark.slow
def test_kill_and_resume_with_lora_equals_the_uninterrupted_run(tmp_path, weights):
    def args(out):
        return seg_args(out, weights, "model.finetune.mode=lora", "model.finetune.layer_decay=0.8",
                        "model.finetune.gradient_checkpointing=true", total_iter=8, checkpoint_interval=4)

    reference, resumed = kill_and_resume(args, tmp_path, total=8)
    assert_same_head(reference, resumed, 8)
    assert any(k.endswith("lora_B") for k in resumed["model"]) and resumed[RECORD] == reference[RECORD]


@pytest.mark.slow
def test_two_process_ddp_trains_the_adapters_without_unused_parameters(tmp_path, weights):
    out = tmp_path / "ddp"
    done = subprocess.run([*TORCHRUN, "-m", "dinoseg.cli", *seg_args(out, weights, "model.finetune.mode=lora",
                                                                     total_iter=4, checkpoint_interval=4)],
                          capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = read_checkpoint(out / LAST)
    assert len(checkpoint["rng"]) == 2
    assert any(v.abs().max() > 0 for k, v in checkpoint["model"].items() if k.endswith("lora_B"))


def test_ddp_syncs_the_head_and_the_adapters_only(tmp_path, weights):
    import torch.distributed as dist

    from dinoseg.engine.training import wrap_distributed
    from dinoseg.eval.segmentation.config import load_config
    from dinoseg.eval.segmentation.setup import build_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model(load_config([], [*TINY, "model.finetune.mode=lora"]), num_classes=4)
        ddp = wrap_distributed(model, torch.device("cpu"))
        synced = {id(p) for p in ddp._module_parameters}
        trains = {id(p) for p in model.parameters() if p.requires_grad}
        lora = {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)}
        assert synced == trains and lora <= synced and len(lora) == 16
        assert frozen_names(model) <= set(ddp.parameters_to_ignore) | {n for n, _ in model.named_buffers()}
    finally:
        dist.destroy_process_group()


# -- every task: LoRA at init is the frozen model, one step changes the adapted tensors only -----------------------

M2F_TINY = ["decoder_head.type=m2f", "decoder_head.backbone_out_layers=FOUR_EVEN_INTERVALS", "decoder_head.hidden_dim=32",
            "decoder_head.m2f.num_queries=8", "decoder_head.m2f.nheads=2", "decoder_head.m2f.dim_feedforward=64",
            "decoder_head.m2f.enc_layers=1", "decoder_head.m2f.dec_layers=2", "decoder_head.m2f.pixel_decoder_nheads=2"]
DETECTION = ["decoder_head.n_windows_sqrt=2", "decoder_head.num_queries_one2one=4", "decoder_head.num_queries_one2many=4"]


def _model(task: str, *extra):
    """(model, backbone, a training step's outputs -> loss) of `task` on the tiny ViT, adapted as `extra` says."""
    if task in ("linear", "m2f"):
        from dinoseg.eval.segmentation.config import load_config
        from dinoseg.eval.segmentation.setup import build_model

        model = build_model(load_config([], [*TINY, *(M2F_TINY if task == "m2f" else []), *extra]), num_classes=3)
        side = model.segmentation_model[0]
        backbone = side.feature_model if task == "linear" else side.backbone
        loss = (lambda out: out.square().mean()) if task == "linear" else (lambda out: out["pred_masks"].square().mean())
        return model, backbone, loss
    if task == "convnext_m2f":
        from dinoseg.eval.segmentation.config import load_config
        from dinoseg.eval.segmentation.setup import build_model

        from .test_convnext_train import CONVNEXT_TINY

        model = build_model(load_config([], [*CONVNEXT_TINY, *M2F_TINY, *extra]), num_classes=3)
        return model, model.segmentation_model[0].backbone, lambda out: out["pred_masks"].square().mean()
    if task in ("depth", "dpt"):
        from dinoseg.eval.depth.config import load_config
        from dinoseg.eval.depth.setup import build_model

        head = ["decoder_head.type=dpt", "decoder_head.backbone_out_layers=FOUR_LAST",
                "decoder_head.head_kwargs.channels=8", "decoder_head.head_kwargs.post_process_channels=[4,8,8,8]"]
        model = build_model(load_config([], [*TINY_DEPTH, *(head if task == "dpt" else []), *extra]))
        return model, model.encoder.backbone, lambda out: out.square().mean()
    from dinoseg.eval.detection.config import load_config
    from dinoseg.eval.detection.setup import build_detector

    from ._detection_run import tiny_detection_args

    model = build_detector(load_config([], [*tiny_detection_args("SyntheticBoxes", "SyntheticBoxes"), *DETECTION,
                                            *extra]), num_classes=3)
    backbone = model.backbone[0]._backbone.backbone
    return model, backbone, lambda out: out["pred_logits"].square().mean() + out["pred_boxes"].square().mean()


TASKS = ["linear", "m2f", "convnext_m2f", "depth", "dpt", "detection"]


@pytest.mark.parametrize("task", TASKS)
def test_lora_at_initialisation_gives_the_frozen_models_outputs_exactly(task):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for mode in ("frozen", "lora"):
        torch.manual_seed(0)  # the same head
        model, backbone, _ = _model(task, f"model.finetune.mode={mode}", "model.finetune.lora_targets=null")
        assert (adaptation_of(backbone) is not None) == (mode == "lora")
        model.eval()
        with torch.no_grad():
            out = model(x)
        outputs[mode] = out if isinstance(out, torch.Tensor) else out["pred_logits" if task == "detection" else
                                                                          "pred_masks"]
    assert torch.equal(outputs["frozen"], outputs["lora"])


@pytest.mark.parametrize("task,mode", [(t, "lora") for t in TASKS] + [("linear", "blocks"), ("convnext_m2f", "blocks"),
                                                                      ("detection", "blocks")])
def test_one_training_step_changes_the_adapted_tensors_and_the_head_only(task, mode):
    from dinoseg.engine.optim import build_optimizer
    from dinoseg.models.finetune import param_groups

    extra = [f"model.finetune.mode={mode}", "model.finetune.blocks=1", "model.finetune.gradient_checkpointing=true"]
    model, backbone, loss_of = _model(task, *extra)
    if task == "m2f":  # the ViT-Adapter's drop path could leave a branch without gradient by chance
        for m in model.modules():
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
    frozen, adapted = frozen_names(model), set(adapted_names(backbone))
    assert adapted and not frozen & {n for n, p in model.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_train_mode(model)
    assert not backbone.training and all(backbone.get_submodule(u).training
                                         for u in adaptation_of(backbone).train_modules)
    optimizer = build_optimizer(model, 1e-2, (0.9, 0.999), 1e-2, param_groups=param_groups(model, 1e-2))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # two steps: LoRA's A has no gradient while B is still zero
        optimizer.zero_grad()
        loss_of(model(x)).backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    prefix = next(name + "." for name, m in model.named_modules() if m is backbone)
    assert not changed & frozen and {prefix + n for n in adapted} <= changed


def test_half_precision_weights_keep_the_adapted_tensors_and_their_optimizer_state_in_float32():
    from dinoseg.eval.segmentation.config import load_config
    from dinoseg.eval.segmentation.setup import build_model, build_optimizer
    from dinoseg.models.precision import cast_weights

    for mode in ("lora", "blocks"):
        cfg = load_config([], [*TINY, "model.weights_dtype=bfloat16", f"model.finetune.mode={mode}"])
        model = build_model(cfg, num_classes=3)
        backbone = model.segmentation_model[0].feature_model
        assert backbone.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
        trained = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
        assert trained and all(p.dtype == torch.float32 for p in trained.values())
        optimizer = build_optimizer(model, cfg)
        set_train_mode(model)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(2, 3, 64, 64)).float().square().mean().backward()
            optimizer.step()
        for name, p in trained.items():
            assert p.dtype == p.grad.dtype == optimizer.state[p]["exp_avg"].dtype == torch.float32, name
        if mode == "lora":  # storing the whole model in half precision (inference) keeps the adapters float32
            cast_weights(model, torch.bfloat16)
            assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("task", ["m2f", "depth", "detection"])
def test_merged_lora_equals_the_unmerged_model(task):
    model, backbone, _ = _model(task, "model.finetune.mode=lora")
    randomize_lora_b(model)
    model.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    first = (lambda out: out) if task == "depth" else (lambda out: out["pred_logits"])
    with torch.no_grad():
        unmerged = first(model(x))
        with merged_lora(model, x, ["out"]) as difference:
            assert not any(isinstance(m, LoRALinear) for m in model.modules())
            merged = first(model(x))
    assert difference is not None and difference <= MERGE_TOLERANCE
    assert (merged - unmerged).abs().max() <= MERGE_TOLERANCE * max(1.0, unmerged.abs().max())


# -- depth: a LoRA run on the random tiny ViT; kill and resume with blocks ----------------------------------------

@pytest.fixture(scope="module")
def depth_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("depth") / "run"
    assert main(["train", *tiny_depth(out, total_iter=10, checkpoint_interval=10, extra=["model.finetune.mode=lora"])]) == 0
    return out


def assert_same_depth_results(evaluated: dict, trained: dict) -> None:
    """The dataset's metrics exactly; each image's to 1e-6: with two intra-op threads (a plain `pytest` on two
    cores, not `make test`'s one thread per worker) the rank-8 LoRA products of the run's process and of a fresh
    `eval` can differ in the last bit of a per-image value while the dataset sums agree."""
    per_image = evaluated.pop("per_image"), trained.pop("per_image")
    assert evaluated == trained
    assert per_image[0].keys() == per_image[1].keys()
    for key, values in per_image[0].items():
        if key in ("index", "name"):
            assert values == per_image[1][key]
        else:
            np.testing.assert_allclose(values, per_image[1][key], rtol=1e-6, err_msg=key)


def test_depth_eval_of_an_adapted_checkpoint_reproduces_the_run(depth_run, capsys):
    out = depth_run
    assert main(["eval", str(out / "depth_config.yaml"), f"head={out / LAST}"]) == 0
    trained = json.loads((out / "results-depth.json").read_text())
    assert_same_depth_results(json.loads((out / "eval" / "checkpoint_last" / "results-depth.json").read_text()),
                              dict(trained))
    assert main(["eval", str(out / "depth_config.yaml"), f"head={out / LAST}", "eval.use_tta=false",
                 f"output_dir={out / 'notta'}"]) == 0
    plain = json.loads((out / "notta" / "eval" / "checkpoint_last" / "results-depth.json").read_text())
    assert {k: plain[k] for k in last_val(out)} == last_val(out)  # the run's own last validation (without TTA)
    # model_final.pth: the head and the adapted tensors under their full names, with the record.
    final, last = read_checkpoint(out / "model_final.pth"), read_checkpoint(out / LAST)
    assert final[RECORD] == last[RECORD] and final["model"].keys() == last["model"].keys()
    assert main(["eval", str(out / "depth_config.yaml"), f"head={out / 'model_final.pth'}"]) == 0
    assert_same_depth_results(json.loads((out / "eval" / "model_final" / "results-depth.json").read_text()),
                              dict(trained))


def test_depth_checkpoint_on_another_backbone_is_refused_in_one_line(depth_run, capsys):
    out = depth_run
    config, head = str(out / "depth_config.yaml"), f"head={out / LAST}"
    line = error_of(capsys, ["eval", config, head, "model.random_init_seed=1"])
    assert line.endswith("adapted on another backbone (random_init_seed: random weights of seed 0 in the checkpoint, "
                         "random weights of seed 1 here); adapted tensors only apply to their own base backbone")
    line = error_of(capsys, ["eval", config, head, "model.backbone_kwargs.embed_dim=64"])
    assert ("adapted on another backbone (architecture: DinoVisionTransformer with 4 layers of width 32" in line
            and "DinoVisionTransformer with 4 layers of width 64" in line)


@pytest.mark.slow
def test_depth_kill_and_resume_with_trained_blocks_equals_the_uninterrupted_run(tmp_path):
    def args(out):
        return ["train", *tiny_depth(out, total_iter=8, checkpoint_interval=4,
                                     extra=["model.finetune.mode=blocks", "model.finetune.blocks=1",
                                            "model.backbone_kwargs.drop_path_rate=0.2"])]

    reference, resumed = kill_and_resume(args, tmp_path, total=8)
    assert_same_head(reference, resumed, 8)
    assert any(k.startswith("encoder.backbone.blocks.3.") for k in resumed["model"])
    assert not any(k.startswith("encoder.backbone.blocks.2.") for k in resumed["model"])


# -- detection: windows, LoRA, gradient checkpointing; the official blocks_to_train ------------------------------

@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    coco = write_coco_folders(root)
    out = root / "run"
    assert main(["train", *tiny_detection(coco, out, total_iter=6, checkpoint_interval=6,
                                          extra=[*DETECTION, "model.finetune.mode=lora",
                                                 "model.finetune.gradient_checkpointing=true"])]) == 0
    return out


def test_detection_eval_of_an_adapted_checkpoint_reproduces_the_run(det_run, capsys):
    checkpoint = read_checkpoint(det_run / LAST)
    assert any(k.startswith("backbone.0._backbone.backbone.blocks.") and k.endswith("lora_B") for k in checkpoint["model"])
    assert checkpoint[RECORD]["finetune"]["gradient_checkpointing"] is True
    # Plain-DETR's lr_backbone (2e-5 at lr 1e-3) is the adapters' learning rate: lr_multiplier 0.02.
    assert [g["lr_scale"] for g in checkpoint["optimizer"]["param_groups"]] == [1.0, 1.0, pytest.approx(0.02)]
    assert main(["eval", str(det_run / "detection_config.yaml"), f"head={det_run / LAST}"]) == 0
    evaluated = json.loads((det_run / "eval" / "checkpoint_last" / "results-detection.json").read_text())
    assert {k: evaluated[k] for k in last_val(det_run)} == last_val(det_run)
    line = error_of(capsys, ["eval", str(det_run / "detection_config.yaml"), f"head={det_run / LAST}",
                             "model.random_init_seed=3"])
    assert "adapted on another backbone (random_init_seed: random weights of seed 0 in the checkpoint" in line


def test_blocks_to_train_is_the_official_name_of_trained_last_blocks(capsys):
    model, backbone, _ = _model("detection", "decoder_head.layers_to_use=2", "decoder_head.blocks_to_train=[2,3]")
    assert adaptation_of(backbone).mode == "blocks"
    trains = {n.split(".")[1] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trains == {"2", "3"}
    with pytest.raises(Exception, match=r"decoder_head.blocks_to_train=\[1, 3\]: dinoseg trains the last blocks the "
                                        r"head reads, here \[2, 3\] \(the head reads up to block 3\); set "
                                        r"model.finetune.blocks=2 instead"):
        _model("detection", "decoder_head.layers_to_use=2", "decoder_head.blocks_to_train=[1,3]")


# -- the hub: a local run's adapted checkpoint ---------------------------------------------------------------------

@pytest.mark.slow
def test_hub_linear_segmentor_rebuilds_a_local_runs_adapted_backbone(tmp_path):
    from dinoseg.eval.segmentation.config import load_config
    from dinoseg.eval.segmentation.run import load_segmentor
    from dinoseg.hub.segmentors import dinov3_vits16_ade20k_linear
    from dinoseg.models.finetune import BackboneMismatchError

    weights = weights_file(tmp_path / "dinov3_vits16_tiny.pth", hub="dinov3_vits16")
    out = tmp_path / "run"
    hub_backbone = ["model.dino_hub=dinov3_vits16", f"model.pretrained_weights={weights}", "model.random_init=false"]
    assert main(["train", *tiny(out, total_iter=3, checkpoint_interval=3,
                                extra=[*hub_backbone, "model.finetune.mode=lora"])]) == 0
    cfg = load_config([str(out / "segmentation_config.yaml")], [f"head={out / LAST}"])
    hub = dinov3_vits16_ade20k_linear(weights=str(out / LAST), backbone_weights=str(weights),
                                      backbone_options=tiny_kwargs(), num_classes=6)
    engine, _ = load_segmentor(cfg, torch.device("cpu"))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hub.eval().predict(x, rescale_to=(64, 64)), engine.predict(x, rescale_to=(64, 64)))
    assert adaptation_of(hub.segmentation_model[0].feature_model).mode == "lora"
    other = tmp_path / "other.pth"
    shutil.copy(weights, other)
    with pytest.raises(BackboneMismatchError, match=r"adapted on another backbone \(weights: dinov3_vits16_tiny.pth"):
        dinov3_vits16_ade20k_linear(weights=str(out / LAST), backbone_weights=str(other),
                                    backbone_options=tiny_kwargs(), num_classes=6)
