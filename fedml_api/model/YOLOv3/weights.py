"""Darknet ``.weights`` files: reading them into a :class:`Darknet` and writing them back.

Layout (little-endian), as Darknet's ``load_weights``/``save_weights`` use it:

* header: ``major``, ``minor``, ``revision`` as int32, then ``seen`` (images seen in
  training) as int64 when ``major * 10 + minor >= 2`` (and both are below 1000), else as
  int32;
* then float32 values for every ``[convolutional]`` layer in cfg order: with batch norm,
  the norm's ``bias`` (beta), ``weight`` (gamma), ``running_mean``, ``running_var``;
  without, the convolution's ``bias``; then the convolution's ``weight``
  ``[out, in, k, k]`` in row-major order.

Other layers hold no weights. A file may stop after any whole layer: a backbone file such
as ``darknet53.conv.74`` holds only the first layers of ``yolov3.cfg``, and loading it
leaves the remaining layers as they were.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from fedml_api.model.YOLOv3.cfg import PathLike
from fedml_api.model.YOLOv3.darknet import ConvBlock, Darknet

logger = logging.getLogger(__name__)

#: ``(major, minor, revision)`` written by :func:`save_darknet_weights` (``seen`` is int64).
WEIGHTS_VERSION = (0, 2, 0)


def _layer_tensors(block: ConvBlock) -> List[torch.Tensor]:
    """The tensors of one convolutional layer, in file order."""
    if block.bn is not None:
        bn = block.bn
        tensors = [bn.bias, bn.weight, bn.running_mean, bn.running_var]
    else:
        tensors = [block.conv.bias]
    return tensors + [block.conv.weight]


def _conv_layers(model: Darknet, cutoff: Optional[int]) -> List[Tuple[int, ConvBlock]]:
    """``(layer index, ConvBlock)`` of every convolutional layer with index < ``cutoff``."""
    stop = len(model.module_list) if cutoff is None else cutoff
    if stop < 0:
        raise ValueError(f"cutoff must be >= 0, got {cutoff}")
    return [
        (index, module)
        for index, module in enumerate(model.module_list)
        if index < stop and isinstance(module, ConvBlock)
    ]


def darknet_weight_count(model: Darknet, cutoff: Optional[int] = None) -> int:
    """Number of float32 values a ``.weights`` file holds for the layers before ``cutoff``
    (all layers when ``None``). The file's size is 20 bytes of header plus 4 per value."""
    return sum(
        t.numel() for _, block in _conv_layers(model, cutoff) for t in _layer_tensors(block)
    )


def save_darknet_weights(
    model: Darknet, path: PathLike, cutoff: Optional[int] = None, seen: int = 0
) -> Path:
    """Write the weights of the layers before ``cutoff`` (all when ``None``) to ``path``.

    ``seen`` is stored in the header (Darknet uses it for its learning-rate schedule).
    Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        np.array(WEIGHTS_VERSION, dtype="<i4").tofile(file)
        np.array([seen], dtype="<i8").tofile(file)
        for _, block in _conv_layers(model, cutoff):
            for tensor in _layer_tensors(block):
                tensor.detach().cpu().to(torch.float32).numpy().astype("<f4").tofile(file)
    return path


def load_darknet_weights(model: Darknet, path: PathLike, cutoff: Optional[int] = None) -> int:
    """Copy the weights in ``path`` into ``model``'s layers before ``cutoff``, in place.

    The file may end after any whole convolutional layer (a backbone file); the layers it
    does not cover keep their values.

    Returns:
        The number of convolutional layers loaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the header is truncated, the file ends inside a layer, or it holds more
            values than the model's layers (it was written for another ``.cfg``).
    """
    path = Path(path)
    with open(path, "rb") as file:
        version = np.fromfile(file, dtype="<i4", count=3)
        if len(version) != 3:
            raise ValueError(f"{path}: too short for a Darknet weights header")
        major, minor = int(version[0]), int(version[1])
        seen_dtype = "<i8" if major * 10 + minor >= 2 and major < 1000 and minor < 1000 else "<i4"
        if len(np.fromfile(file, dtype=seen_dtype, count=1)) != 1:
            raise ValueError(f"{path}: too short for a Darknet weights header")
        values = np.fromfile(file, dtype="<f4")
    layers = _conv_layers(model, cutoff)
    offset = 0
    loaded = 0
    for index, block in layers:
        if offset == len(values):
            break
        tensors = _layer_tensors(block)
        needed = sum(t.numel() for t in tensors)
        if offset + needed > len(values):
            raise ValueError(
                f"{path} ends inside layer {index} ({block.conv}): it needs {needed} values, "
                f"{len(values) - offset} remain; the file does not match {model.cfg_path}"
            )
        with torch.no_grad():
            for tensor in tensors:
                chunk = torch.from_numpy(values[offset : offset + tensor.numel()].copy())
                tensor.copy_(chunk.view_as(tensor))
                offset += tensor.numel()
        loaded += 1
    if offset != len(values):
        raise ValueError(
            f"{path} holds {len(values)} values but the {len(layers)} convolutional layers of "
            f"{model.cfg_path}{'' if cutoff is None else f' before layer {cutoff}'} take "
            f"{offset}; the file was written for another network"
        )
    logger.info(
        "loaded Darknet weights %s (version %d.%d.%d): %d of %d convolutional layers",
        path, major, minor, int(version[2]), loaded, len(layers),
    )
    return loaded
