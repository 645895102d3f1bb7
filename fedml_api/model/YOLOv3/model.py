"""Building the experiment's detector from its command-line arguments."""

from __future__ import annotations

from argparse import Namespace

from fedml_api.model.YOLOv3.cfg import resolve_cfg_path
from fedml_api.model.YOLOv3.darknet import Darknet
from fedml_api.model.YOLOv3.weights import load_darknet_weights


def create_model(args: Namespace) -> Darknet:
    """The :class:`Darknet` of ``args.model_def``, with ``args.pretrained_weights`` loaded.

    Reads ``args.model_def`` (a ``.cfg`` path or the name of a shipped file, see
    :func:`resolve_cfg_path`), ``args.pretrained_weights`` (a Darknet ``.weights`` file or
    ``None``) and ``args.img_size``, which must be a multiple of the network's stride.
    Every process builds the model the same way, so all start from the same weights when
    they share the seed or the weights file.
    """
    model = Darknet(resolve_cfg_path(args.model_def))
    if args.img_size % model.max_stride:
        raise ValueError(
            f"--img_size {args.img_size} must be a multiple of {model.max_stride}, the stride "
            f"of {args.model_def}"
        )
    if args.pretrained_weights:
        load_darknet_weights(model, args.pretrained_weights)
    return model
