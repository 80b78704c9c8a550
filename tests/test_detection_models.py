"""The official DINOv3 detector (Plain-DETR) at its official paths: parity with the official reference outputs
(eval, PostProcess and training-mode outputs, official keys, strict loads), the hub's attribute patching, batches,
dropout, the frozen backbone, and the settings the official code builds but cannot run."""

import copy
import dataclasses
import inspect
import json
from functools import cache
from pathlib import Path

import pytest
import torch

from dinoseg.eval.detection.config import DetectionHeadConfig
from dinoseg.eval.detection.models import position_encoding
from dinoseg.eval.detection.models.backbone import DINOBackbone
from dinoseg.eval.detection.models.detr import PlainDETR, PlainDETRReParam, PostProcess, build_model
from dinoseg.eval.detection.models.position_encoding import PositionEncoding
from dinoseg.eval.detection.models.windows import window_sizes
from dinoseg.eval.detection.util.box_ops import delta2bbox
from dinoseg.eval.detection.util.misc import NestedTensor, nested_tensor_from_tensor_list
from dinoseg.models.frozen import head_state_dict, set_train_mode
from dinoseg.models.precision import cast_weights
from dinoseg.models.vision_transformer import DinoVisionTransformer

DETECTION_FIXTURES = Path(__file__).parent / "fixtures" / "official" / "detection"
FIXTURES = ["detector_plain_no_windows.pt", "detector_reparam_windows.pt"]
TOL = dict(atol=1e-5, rtol=1e-5)


@cache
def detection_index() -> dict:
    return json.loads((DETECTION_FIXTURES / "index.json").read_text())


@cache
def _fixture(name: str) -> dict:
    return torch.load(DETECTION_FIXTURES / name, map_location="cpu", weights_only=True)


def official_detector(name: str, **overrides) -> tuple[PlainDETR, dict]:
    """The fixture's detector, built from its settings (`overrides` change some) and loaded strictly; eval mode."""
    meta = detection_index()[name]
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(**meta["backbone_kwargs"])
    model = build_model(backbone, DetectionHeadConfig(**{**meta["head_config"], **overrides}))
    data = _fixture(name)
    model.load_state_dict(data["state_dict"], strict=True)
    return model.eval(), data


def flatten(outputs: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested outputs as the fixtures store them: ``aux_outputs.<i>.<key>``, ``enc_outputs.<key>``."""
    flat = {}
    for key, value in outputs.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                flat.update(flatten(item, f"{prefix}{key}.{i}."))
        else:
            flat[prefix + key] = value
    return flat


def image_sizes(images) -> torch.Tensor:
    return torch.tensor([tuple(image.shape[-2:]) for image in images])


# -- parity -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURES)
def test_official_keys_and_strict_load(name):
    model, data = official_detector(name)
    assert list(model.state_dict()) == list(data["state_dict"])  # the official names, in the official order
    assert len(data["state_dict"]) == detection_index()[name]["state_dict_entries"]
    expected_class = PlainDETRReParam if detection_index()[name]["head_config"]["reparam"] else PlainDETR
    assert type(model) is expected_class
    head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    assert head == detection_index()[name]["head_parameters"]
    broken = dict(data["state_dict"])
    broken.pop("query_embed.weight")
    with pytest.raises(RuntimeError, match="query_embed.weight"):
        model.load_state_dict(broken, strict=True)


@pytest.mark.parametrize("name", FIXTURES)
def test_eval_outputs_and_postprocess_match_official(name):
    model, data = official_detector(name)
    with torch.no_grad():
        out = model(data["images"])
    ref = data["eval"]
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], **TOL)
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], **TOL)
    sizes = image_sizes(data["images"])
    topk, reparam = (detection_index()[name]["head_config"][k] for k in ("topk", "reparam"))
    # The official hub's call (original sizes = sizes) and dinoseg's default (original sizes left out) agree.
    for results in (PostProcess(topk, reparam)(out, sizes, sizes), PostProcess(topk, reparam)(out, sizes)):
        for i, result in enumerate(results):
            torch.testing.assert_close(result["scores"], ref[f"post.{i}.scores"], **TOL)
            torch.testing.assert_close(result["labels"], ref[f"post.{i}.labels"])
            torch.testing.assert_close(result["boxes"], ref[f"post.{i}.boxes"], **TOL)


@pytest.mark.parametrize("name", FIXTURES)
def test_training_outputs_match_official(name):
    """Head in train(), frozen backbone in eval(): every output the loss uses, with the official keys and nesting."""
    model, data = official_detector(name)
    set_train_mode(model)
    model.train()  # also directly: the frozen ViT stays in eval mode
    assert model.training
    vit = next(m for m in model.modules() if isinstance(m, DinoVisionTransformer))
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())
    out = model(data["images"])
    flat = flatten(out)
    assert set(flat) == set(data["train"])
    for key, expected in data["train"].items():
        torch.testing.assert_close(flat[key], expected, **TOL, msg=key)
    assert out["pred_logits"].requires_grad
    assert len(out["aux_outputs"]) == len(out["aux_outputs_one2many"]) == detection_index()[name]["head_config"]["dec_layers"] - 1
    loss = sum(v.float().sum() for k, v in flat.items() if "logits" in k or "deltas" in k)
    loss.backward()
    assert model.input_proj[0][0].weight.grad is not None and model.query_embed.weight.grad is not None
    assert all(p.grad is None for p in vit.parameters())


@pytest.mark.parametrize("name", FIXTURES)
def test_head_checkpoint_leaves_the_backbone_out(name):
    model, data = official_detector(name)
    head = head_state_dict(model)
    windows = detection_index()[name]["head_config"]["n_windows_sqrt"] > 0
    vit_prefix = "backbone.0._backbone.backbone." if windows else "backbone.0.backbone."
    assert set(head) == {k for k in data["state_dict"] if not k.startswith(vit_prefix)}
    layer_norms = {k for k in head if k.startswith("backbone.")}
    assert bool(layer_norms) == detection_index()[name]["head_config"]["backbone_use_layernorm"]


# -- the hub's inference set-up ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURES)
def test_eval_mode_runs_the_one_to_one_queries_and_the_official_patch_still_works(name):
    model, data = official_detector(name)
    n1 = model.num_queries_one2one
    with torch.no_grad():
        out = model(data["images"])
        assert out["pred_logits_one2many"].shape[1] == 0 and out["pred_logits"].shape[1] == n1
        patched = copy.deepcopy(model)
        patched.num_queries = patched.num_queries_one2one  # the official hub's two lines
        patched.transformer.two_stage_num_proposals = patched.num_queries
        torch.testing.assert_close(patched(data["images"])["pred_logits"], data["eval"]["pred_logits"], **TOL)
        patched.train()
        trained = patched(data["images"])  # patched: one-to-one queries in training too
        assert trained["pred_logits_one2many"].shape[1] == 0
        torch.testing.assert_close(trained["pred_boxes"], data["eval"]["pred_boxes"], **TOL)


@pytest.mark.parametrize("name", FIXTURES)
def test_input_forms_agree(name):
    """A list of images, the NestedTensor they pad to, and a (B, 3, H, W) tensor of same-size images."""
    model, data = official_detector(name)
    with torch.no_grad():
        nested = nested_tensor_from_tensor_list(data["images"])
        torch.testing.assert_close(model(nested)["pred_logits"], data["eval"]["pred_logits"], **TOL)
        torch.manual_seed(1)
        batch = torch.randn(2, 3, 64, 96)
        torch.testing.assert_close(model(batch)["pred_boxes"], model(list(batch))["pred_boxes"], **TOL)
        torch.testing.assert_close(model(NestedTensor(batch, None))["pred_boxes"], model(list(batch))["pred_boxes"])
    with pytest.raises(TypeError, match="list of \\(3, H, W\\) image tensors"):
        model(torch.randn(3, 64, 64))


@pytest.mark.parametrize("name", FIXTURES)
def test_batch_of_one_and_of_different_sizes(name):
    model, data = official_detector(name)
    torch.manual_seed(2)
    a, b = torch.randn(3, 64, 96), torch.randn(3, 64, 96)
    with torch.no_grad():
        alone = model([a])
        together = model([a, b])
        # Without padding, an image's detections do not depend on the rest of the batch.
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(together[key][:1], alone[key], **TOL)
        tall, wide, square = torch.randn(3, 128, 64), torch.randn(3, 64, 112), torch.randn(3, 80, 80)
        out = model([tall, wide, square])
    assert out["pred_logits"].shape == (3, model.num_queries_one2one, 7)
    assert torch.isfinite(out["pred_boxes"]).all()
    results = PostProcess(10, model.__class__ is PlainDETRReParam)(out, image_sizes([tall, wide, square]))
    for result, (h, w) in zip(results, [(128, 64), (64, 112), (80, 80)]):
        boxes = result["boxes"]
        assert boxes.shape == (10, 4) and (boxes[:, 0::2] <= w + 1e-4).all() and (boxes[:, 1::2] <= h + 1e-4).all()


def test_sizes_not_a_multiple_of_the_patch_are_padded_and_masked():
    model, _ = official_detector(FIXTURES[1])
    torch.manual_seed(3)
    image = torch.randn(3, 100, 120)
    padded = torch.zeros(1, 3, 112, 128)
    padded[0, :, :100, :120] = image
    mask = torch.ones(1, 112, 128, dtype=torch.bool)
    mask[0, :100, :120] = False
    with torch.no_grad():
        torch.testing.assert_close(model([image])["pred_boxes"], model(NestedTensor(padded, mask))["pred_boxes"])


# -- dropout, the frozen backbone ------------------------------------------------------------------------------------

def _encoder_dropouts(model) -> set[float]:
    return {m.p for layer in model.transformer.encoder.layers for m in (layer.dropout, layer.dropout1, layer.dropout2)}


def test_dropout_is_honoured_in_the_encoder():
    """The official `build_transformer` drops at 0.1 in the encoder whatever `dropout` says; dinoseg passes it on
    (`encoder_dropout` restores the official value)."""
    name = FIXTURES[0]
    model, data = official_detector(name)
    assert _encoder_dropouts(model) == {0.0}
    model.train()
    torch.testing.assert_close(model(data["images"])["pred_logits"], model(data["images"])["pred_logits"])
    noisy, _ = official_detector(name, dropout=0.3)
    assert _encoder_dropouts(noisy) == {0.3} and noisy.transformer.decoder.layers[0].dropout1.p == 0.3
    noisy.train()
    assert not torch.equal(noisy(data["images"])["pred_logits"], noisy(data["images"])["pred_logits"])
    official, _ = official_detector(name, encoder_dropout=0.1)
    assert _encoder_dropouts(official) == {0.1} and official.transformer.decoder.layers[0].dropout1.p == 0.0
    with torch.no_grad():  # eval mode: no dropout anywhere, the fixture's outputs
        torch.testing.assert_close(official(data["images"])["pred_logits"], data["eval"]["pred_logits"], **TOL)


def test_trainable_backbone_blocks_follow_the_official_rule():
    """`DINOBackbone(train_backbone=True)`: the blocks named in `blocks_to_train` train (never the mask token);
    `build_backbone` passes False, as the official code: frozen and marked."""
    vit = DinoVisionTransformer(embed_dim=64, depth=4, num_heads=4, patch_size=16)
    backbone = DINOBackbone(vit, True, blocks_to_train=["1"], layers_to_use=2, use_layernorm=False)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("blocks.1.") for n in trainable)
    backbone.train()
    assert vit.training and backbone.num_channels == [128]
    frozen = DINOBackbone(DinoVisionTransformer(embed_dim=64, depth=4, num_heads=4), False, layers_to_use=[0, 3])
    frozen.train()
    assert not frozen.backbone.training and not any(p.requires_grad for p in frozen.backbone.parameters())


# -- configuration -------------------------------------------------------------------------------------------------

OFFICIAL_DEFAULTS = dict(
    num_classes=91, with_box_refine=True, two_stage=True, mixed_selection=True, look_forward_twice=True, k_one2many=6,
    lambda_one2many=1.0, num_queries_one2one=300, num_queries_one2many=1500, reparam=True, topk=100,
    position_embedding=PositionEncoding.SINE, num_feature_levels=1, dec_layers=6, dim_feedforward=2048, hidden_dim=256,
    dropout=0.0, nheads=8, norm_type="pre_norm", aux_loss=True, proposal_feature_levels=4, proposal_min_size=50,
    decoder_type="global_rpe_decomp", decoder_use_checkpoint=False, decoder_rpe_hidden_dim=512,
    decoder_rpe_type="linear", add_transformer_encoder=True, num_encoder_layers=6, layers_to_use=None,
    blocks_to_train=None, n_windows_sqrt=0, proposal_in_stride=None, proposal_tgt_strides=None,
    backbone_use_layernorm=False,
)


def test_head_config_has_the_official_fields_and_defaults():
    config = DetectionHeadConfig()
    fields = [f.name for f in dataclasses.fields(DetectionHeadConfig)]
    assert fields == list(OFFICIAL_DEFAULTS) + ["encoder_dropout"]
    assert {k: getattr(config, k) for k in OFFICIAL_DEFAULTS} == OFFICIAL_DEFAULTS and config.encoder_dropout is None
    with pytest.raises(TypeError):
        DetectionHeadConfig(91)  # keyword-only, as officially
    import dinoseg
    from dinoseg.eval.detection import models

    assert dinoseg.DetectionHeadConfig is models.DetectionHeadConfig is DetectionHeadConfig
    assert dinoseg.PlainDETR is PlainDETR and dinoseg.PlainDETRReParam is PlainDETRReParam


def test_official_call_forms():
    signatures = {
        PlainDETR.__init__: ["self", "backbone", "transformer", "num_classes", "num_feature_levels", "aux_loss",
                             "with_box_refine", "two_stage", "num_queries_one2one", "num_queries_one2many",
                             "mixed_selection"],
        PostProcess.__init__: ["self", "topk", "reparam"],
        PostProcess.forward: ["self", "outputs", "target_sizes", "original_target_sizes"],
        build_model: ["backbone_model", "args"],
        DINOBackbone.__init__: ["self", "backbone_model", "train_backbone", "blocks_to_train", "layers_to_use",
                                "use_layernorm"],
    }
    for fn, names in signatures.items():
        assert list(inspect.signature(fn).parameters) == names, fn


def test_unset_backbone_fields_are_filled_as_the_official_hub_does():
    """The official `build_model` crashes on the config's own defaults (None); dinoseg fills them from the backbone."""
    meta = detection_index()[FIXTURES[1]]
    settings = {**meta["head_config"], "layers_to_use": None, "proposal_in_stride": None, "proposal_tgt_strides": None}
    model = build_model(DinoVisionTransformer(**{**meta["backbone_kwargs"], "depth": 8}), DetectionHeadConfig(**settings))
    assert model.backbone[0]._backbone.layers_to_use == [1, 3, 5, 7]
    assert model.transformer.proposal_in_stride == 16 and model.transformer.proposal_tgt_strides == [8, 16, 32, 64]
    assert settings["layers_to_use"] is None  # the caller's config is left alone


@pytest.mark.parametrize("overrides, message", [
    (dict(with_box_refine=False), "two_stage=True needs with_box_refine=True"),
    (dict(two_stage=False, reparam=False), "'global_rpe_decomp' needs two_stage=True"),
    (dict(decoder_type="global_ape"), "reparam=True needs two_stage=True and decoder_type='global_rpe_decomp'"),
    (dict(decoder_type="deform"), "decoder_type must be one of"),
    (dict(norm_type="layer_norm"), "norm_type must be"),
    (dict(hidden_dim=48, nheads=4), "hidden_dim=48 must be a multiple of 32"),
    (dict(position_embedding="cosine"), "unknown position_embedding 'cosine'"),
    (dict(layers_to_use=[0, 9]), r"layers_to_use=\[0, 9\]: block indices must lie in \[0, 3\]"),
    (dict(decoder_rpe_type="box_norm"), "decoder_rpe_type must be one of"),
    (dict(proposal_tgt_strides=[8, 16, 48, 64]), "stride 48 is not a power-of-two"),
    (dict(proposal_tgt_strides=[8, 16, 32]), "one stride per proposal level"),
])
def test_settings_the_official_code_cannot_run_fail_at_build(overrides, message):
    with pytest.raises(ValueError, match=message):
        official_detector(FIXTURES[1], **overrides)


@pytest.mark.parametrize("overrides", [
    dict(decoder_type="global_ape", reparam=False),  # official: crashes (integer attention mask)
    dict(decoder_type="global_ape", reparam=False, two_stage=False),
    dict(decoder_type="global_ape", reparam=False, two_stage=False, with_box_refine=False),  # official: look_forward_twice
    dict(reparam=False, decoder_rpe_type="abs_log8", norm_type="post_norm", decoder_use_checkpoint=True),
    dict(position_embedding="sine_unnorm", backbone_use_layernorm=True, aux_loss=False),
    dict(position_embedding=PositionEncoding.LEARNED, num_encoder_layers=2, add_transformer_encoder=True),
    dict(add_transformer_encoder=False, proposal_feature_levels=1, mixed_selection=False),
])
def test_other_settings_train_and_infer(overrides):
    meta = detection_index()[FIXTURES[1]]
    torch.manual_seed(0)
    model = build_model(DinoVisionTransformer(**meta["backbone_kwargs"]), DetectionHeadConfig(**{**meta["head_config"],
                                                                                                **overrides}))
    images = _fixture(FIXTURES[1])["images"]
    model.train()
    out = flatten(model(images))
    assert all(torch.isfinite(v[v.abs() != float("inf")]).all() for v in out.values())
    sum(v[v.isfinite()].sum() for k, v in out.items() if "logits" in k).backward()
    assert model.query_embed.weight.grad is not None if hasattr(model, "query_embed") else True
    assert ("aux_outputs.0.pred_logits" in out) == model.aux_loss
    assert ("enc_outputs.pred_logits" in out) == model.two_stage
    model.eval()
    with torch.no_grad():
        assert model(images)["pred_boxes"].shape == (2, model.num_queries_one2one, 4)


def test_decoder_checkpointing_changes_nothing_but_memory():
    name = FIXTURES[1]
    plain, data = official_detector(name)
    checkpointed, _ = official_detector(name, decoder_use_checkpoint=True)
    plain.train()
    checkpointed.train()
    a, b = plain(data["images"]), checkpointed(data["images"])
    torch.testing.assert_close(flatten(a), flatten(b))
    (a["pred_logits"].sum() + a["pred_deltas"].sum()).backward()
    (b["pred_logits"].sum() + b["pred_deltas"].sum()).backward()
    torch.testing.assert_close(checkpointed.transformer.decoder.layers[0].linear1.weight.grad,
                               plain.transformer.decoder.layers[0].linear1.weight.grad)


# -- smaller parts -------------------------------------------------------------------------------------------------

def test_half_precision_weights():
    """Weights in bfloat16 / float16 (norms float32): float32 inputs and outputs, under autocast by itself. Per
    query outputs can swap (near-tied proposal scores rank differently), so the per-proposal outputs are compared."""
    model, data = official_detector(FIXTURES[1])
    with torch.no_grad():
        reference = model(data["images"])["enc_outputs"]
        for dtype in (torch.bfloat16, torch.float16):
            half = cast_weights(copy.deepcopy(model), dtype)
            assert half.transformer.decoder.layers[0].linear1.weight.dtype == dtype
            assert half.transformer.decoder.layers[0].norm1.weight.dtype == torch.float32
            out = half(data["images"])
            assert {v.dtype for v in flatten(out).values()} == {torch.float32}
            enc = out["enc_outputs"]
            assert (enc["pred_logits"] - reference["pred_logits"]).abs().max() < 0.1
            relative = (enc["pred_boxes"] - reference["pred_boxes"]).abs() / reference["pred_boxes"].abs().clamp(min=1)
            assert relative.max() < 0.02


def test_position_encodings():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[:, :, 3] = True  # a padded column
    features = NestedTensor(torch.zeros(1, 8, 3, 4), mask)
    sine = position_encoding.PositionEmbeddingSine(4, normalize=True)(features)
    assert sine.shape == (1, 8, 3, 4)
    # Normalised: the last unpadded row / column sits at 2 pi (y channels first; channel 0 = sin(y / 1)).
    torch.testing.assert_close(sine[0, 0, 2, 0], torch.sin(torch.tensor(2.5 / 3 * 2 * torch.pi)), atol=1e-5, rtol=0)
    torch.testing.assert_close(sine[0, 4, 0, 2], torch.sin(torch.tensor(2.5 / 3 * 2 * torch.pi)), atol=1e-5, rtol=0)
    learned = position_encoding.PositionEmbeddingLearned(4)
    assert learned(features).shape == (1, 8, 3, 4)
    with pytest.raises(ValueError, match="exceeds its 50 x 50 table"):
        learned(NestedTensor(torch.zeros(1, 8, 3, 51), None))
    assert PositionEncoding.parse("SINE_UNNORM") is PositionEncoding.parse("sine_unnorm") is PositionEncoding.SINE_UNNORM
    with pytest.raises(ValueError, match="normalize should be True"):
        position_encoding.PositionEmbeddingSine(4, scale=1.0)


def test_window_sizes():
    assert window_sizes(128, 2, 16) == [64, 64]
    assert window_sizes(112, 2, 16) == [64, 48]
    assert window_sizes(96, 3, 16) == [32, 32, 32]
    with pytest.raises(ValueError, match="last window would be 8 px"):
        window_sizes(40, 3, 16)


def test_postprocess_scaling_and_topk():
    logits = torch.full((1, 3, 2), -5.0)
    logits[0, 1, 1] = 5.0
    outputs = {"pred_logits": logits, "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 3])}
    result = PostProcess(topk=100)(outputs, torch.tensor([[100, 200]]))[0]  # k larger than 3 x 2: all of them
    assert len(result["scores"]) == 6 and result["labels"][0] == 1
    torch.testing.assert_close(result["boxes"][0], torch.tensor([80.0, 40.0, 120.0, 60.0]))
    absolute = {"pred_logits": logits, "pred_boxes": torch.tensor([[[100.0, 20.0, 40.0, 60.0]] * 3])}
    sizes = torch.tensor([[40, 110]])
    clipped = PostProcess(topk=1, reparam=True)(absolute, sizes)[0]["boxes"][0]
    torch.testing.assert_close(clipped, torch.tensor([80.0, 0.0, 110.0, 40.0]))
    doubled = PostProcess(topk=1, reparam=True)(absolute, sizes, 2 * sizes)[0]["boxes"][0]
    torch.testing.assert_close(doubled, 2 * clipped)
    with pytest.raises(ValueError, match="target_sizes must be"):
        PostProcess()(outputs, torch.tensor([100, 200]))


def test_delta2bbox_clips_each_image_to_its_own_size():
    proposals = torch.tensor([[[50.0, 50.0, 200.0, 200.0]], [[50.0, 50.0, 200.0, 200.0]]])
    deltas = torch.zeros(2, 1, 4)
    heights, widths = torch.tensor([[[80]], [[100]]]), torch.tensor([[[60]], [[120]]])
    boxes = delta2bbox(proposals, deltas, (heights, widths))
    torch.testing.assert_close(boxes, torch.tensor([[[0.0, 0.0, 60.0, 80.0]], [[0.0, 0.0, 120.0, 100.0]]]))
    torch.testing.assert_close(delta2bbox(proposals, deltas, (80, 60)), boxes[:1].expand(2, -1, -1))
