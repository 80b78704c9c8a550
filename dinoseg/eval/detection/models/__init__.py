"""The official DINOv3 detector (Plain-DETR) at its official paths: `detr` (`PlainDETR`, `PlainDETRReParam`,
`PostProcess`, `build_model`), `backbone`, `windows`, `position_encoding`, `transformer`, `transformer_encoder`,
`global_ape_decoder`, `global_rpe_decomp_decoder`, `utils`; and `DetectionHeadConfig`, the head's settings
(also at its official path, `dinoseg.eval.detection.config`)."""

from dataclasses import dataclass

from .position_encoding import PositionEncoding


@dataclass(kw_only=True)
class DetectionHeadConfig:
    """The detector head's settings: the official fields and defaults (`dinov3.eval.detection.config`), plus
    dinoseg's `encoder_dropout`. The released COCO detector's values are in `dinoseg.hub.detectors`."""

    num_classes: int = 91  # COCO's 91 category ids
    # Deformable DETR: iterative box refinement, two-stage proposals
    with_box_refine: bool = True
    two_stage: bool = True
    # DINO: learned query content, positions from the proposals; look-forward-twice box gradients
    mixed_selection: bool = True
    look_forward_twice: bool = True
    # Hybrid matching: each target matched k_one2many times by the one-to-many queries (training only)
    k_one2many: int = 6
    lambda_one2many: float = 1.0
    num_queries_one2one: int = 300
    num_queries_one2many: int = 1500
    # Absolute boxes in pixels and box-delta regression (PlainDETRReParam)
    reparam: bool = True
    topk: int = 100  # detections kept per image by PostProcess

    # Backbone
    position_embedding: PositionEncoding | str = PositionEncoding.SINE
    num_feature_levels: int = 1

    # Transformer
    dec_layers: int = 6
    dim_feedforward: int = 2048  # the decoder's (the encoder's is 2048 whatever this says, officially)
    hidden_dim: int = 256
    dropout: float = 0.0  # the decoder's and, in dinoseg, the encoder's (see encoder_dropout)
    nheads: int = 8
    norm_type: str = "pre_norm"  # the decoder's (the encoder is post-norm, officially)

    # Loss
    aux_loss: bool = True  # a loss on every decoder layer (the model returns aux_outputs)

    # Proposals
    proposal_feature_levels: int = 4
    proposal_min_size: int = 50
    # Decoder
    decoder_type: str = "global_rpe_decomp"  # or "global_ape"
    decoder_use_checkpoint: bool = False
    decoder_rpe_hidden_dim: int = 512
    decoder_rpe_type: str = "linear"  # or "abs_log8"

    # DINOv3 additions
    add_transformer_encoder: bool = True
    num_encoder_layers: int = 6
    layers_to_use: int | list[int] | None = None  # None: four blocks evenly spaced
    blocks_to_train: list[int] | None = None  # no effect here, as officially (a config maps it to model.finetune)
    n_windows_sqrt: int = 0  # n x n windows plus a low-resolution whole view when above 0
    proposal_in_stride: int | None = None  # None: the backbone's patch size
    proposal_tgt_strides: list[int] | None = None  # None: 0.5, 1, 2 and 4 times the patch size
    backbone_use_layernorm: bool = False  # a trainable LayerNorm on each backbone layer's features

    # dinoseg: the encoder's dropout; None follows `dropout` (the official code ignores `dropout` there and uses
    # 0.1 in training: set 0.1 to reproduce it)
    encoder_dropout: float | None = None


from .detr import PlainDETR, PlainDETRReParam, PostProcess, build_model  # noqa: E402

__all__ = ["DetectionHeadConfig", "PlainDETR", "PlainDETRReParam", "PositionEncoding", "PostProcess", "build_model"]
