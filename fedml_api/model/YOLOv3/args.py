"""Command-line arguments for training and testing the YOLOv3 detectors."""

from __future__ import annotations

import argparse

from fedml_api.utils.lr_schedule import LR_SCHEDULES
from fedml_api.model.YOLOv3.YOLOv3Trainer import OPTIMIZERS

#: ``--model_def`` default: a file shipped in fedml_api/model/YOLOv3/cfg/.
DEFAULT_MODEL_DEF = "yolov3.cfg"


def add_yolov3_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the model's training and testing arguments to ``parser`` and return it.

    The federation's own arguments (rounds, clients, data path, ...) are added elsewhere;
    call :func:`check_yolov3_args` on the parsed result.
    """
    model = parser.add_argument_group("YOLOv3 model")
    model.add_argument(
        "--model_def",
        default=DEFAULT_MODEL_DEF,
        help="Darknet .cfg file, or the name of a shipped one (yolov3.cfg, yolov3-tiny.cfg)",
    )
    model.add_argument(
        "--pretrained_weights",
        default=None,
        help="Darknet .weights file to start from (a full model or a backbone such as "
        "darknet53.conv.74); default: random initialisation",
    )
    model.add_argument(
        "--img_size", type=int, default=416, help="square input side in pixels (a multiple of 32)"
    )

    train = parser.add_argument_group("YOLOv3 local training")
    train.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    train.add_argument("--batch_size", type=int, default=16, help="local training batch size")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="local optimiser")
    train.add_argument("--lr", type=float, default=1e-3, help="base learning rate")
    train.add_argument("--momentum", type=float, default=0.937, help="SGD momentum (Nesterov)")
    train.add_argument(
        "--wd", type=float, default=5e-4, help="weight decay of the convolution weights"
    )
    train.add_argument(
        "--lr_schedule",
        choices=LR_SCHEDULES,
        default="cosine",
        help="learning rate over federated rounds: constant, or cosine decay to ~0",
    )
    train.add_argument("--no_augment", action="store_true", help="train without augmentation")
    train.add_argument("--aug_scale", type=float, default=0.25, help="random rescale by 1 +- this")
    train.add_argument(
        "--aug_translate", type=float, default=0.1, help="random shift, fraction of the image side"
    )
    train.add_argument("--aug_flip", type=float, default=0.5, help="left-right flip probability")
    train.add_argument("--aug_hsv_h", type=float, default=0.015, help="hue shift (fraction of the circle)")
    train.add_argument("--aug_hsv_s", type=float, default=0.7, help="saturation gain 1 +- this")
    train.add_argument("--aug_hsv_v", type=float, default=0.4, help="brightness gain 1 +- this")

    test = parser.add_argument_group("YOLOv3 testing")
    test.add_argument("--test_batch_size", type=int, default=32, help="evaluation batch size")
    test.add_argument(
        "--conf_thres", type=float, default=0.001, help="minimum detection score kept for mAP"
    )
    test.add_argument("--nms_iou", type=float, default=0.6, help="IoU threshold of NMS")
    test.add_argument("--max_det", type=int, default=100, help="detections kept per image")
    test.add_argument(
        "--no_match_stats",
        dest="match_stats",
        action="store_false",
        help="clients report only scalar metrics; the server then reports their weighted "
        "means instead of the exact metrics of the union of the test sets",
    )
    return parser


def check_yolov3_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first out-of-range model argument."""
    for name in ("img_size", "epochs", "batch_size", "test_batch_size", "max_det"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("lr", "momentum", "wd"):
        if not getattr(args, name) >= 0:  # written so that NaN is rejected too
            raise ValueError(f"--{name} must be a number >= 0, got {getattr(args, name)}")
    for name in ("conf_thres", "nms_iou", "aug_scale", "aug_translate", "aug_flip", "aug_hsv_s", "aug_hsv_v"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if not 0 <= args.aug_hsv_h <= 0.5:
        raise ValueError(f"--aug_hsv_h must be in [0, 0.5], got {args.aug_hsv_h}")
