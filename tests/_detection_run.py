"""Tiny detection runs for the task tests: the engine tests' tiny ViT with a tiny Plain-DETR head, on a COCO-format
folder of synthetic shapes that the tests write (as a user's own data would be)."""

from dinoseg.data import SyntheticBoxes

from .engine_utils import TINY, run_args

BACKBONE = [item for item in TINY if item.startswith("model.")]

TINY_HEAD = [
    "decoder_head.layers_to_use=2",
    "decoder_head.hidden_dim=32",
    "decoder_head.nheads=4",
    "decoder_head.dim_feedforward=64",
    "decoder_head.num_encoder_layers=1",
    "decoder_head.dec_layers=2",
    "decoder_head.num_queries_one2one=10",
    "decoder_head.num_queries_one2many=10",
    "decoder_head.k_one2many=2",
    "decoder_head.decoder_rpe_hidden_dim=16",
    "decoder_head.reparam=false",
]


def write_coco_folders(root, image_size=64, train=16, val=7):
    """SyntheticBoxes train / val splits written as COCO folders (PNG images + annotations.json, category ids 1, 3,
    5, 7); returns (train descriptor, val descriptor) for `CocoJson`."""
    out = []
    for split, n in (("train", train), ("val", val)):
        images, annotations = SyntheticBoxes(split, n, image_size).write_coco(str(root / split))
        out.append(f"CocoJson:images={images}:annotations={annotations}")
    return tuple(out)


def tiny_detection_args(train: str, val: str, image_size: int = 64) -> list[str]:
    return [
        "task=detection",
        "device=cpu",
        *BACKBONE,
        *TINY_HEAD,
        f"datasets.train={train}",
        f"datasets.val={val}",
        f"transforms.train.scales=[{image_size}]",
        "transforms.train.max_size=null",
        "transforms.train.crop_scales=null",
        f"transforms.eval.size={image_size}",
        "transforms.eval.max_size=null",
        "train.batch_size=4",
        "train.num_workers=0",
        "train.log_interval=2",
        "optimizer.lr=1e-3",
        "scheduler.warmup_iters=2",
        "scheduler.milestones=[]",
        "eval.score_threshold=0.0",
    ]


def tiny_detection(data: tuple[str, str], output_dir, total_iter=8, eval_interval=None, checkpoint_interval=4, extra=()):
    return run_args(tiny_detection_args(*data), output_dir, total_iter, eval_interval, checkpoint_interval, extra)
