"""The Darknet network of a ``.cfg`` file as a ``torch.nn.Module`` (YOLOv3 and YOLOv3-tiny).

Supported layer types: ``[convolutional]`` (optional batch norm, ``leaky`` or ``linear``
activation), ``[maxpool]``, ``[upsample]``, ``[route]`` (concatenation of earlier
layers), ``[shortcut]`` (residual sum) and ``[yolo]`` (a detection head). Parameter names
are ``module_list.<layer>.conv.weight``, ``module_list.<layer>.bn.running_mean``, etc.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from fedml_api.model.YOLOv3.cfg import CfgSection, PathLike, parse_cfg

#: Negative slope of Darknet's ``leaky`` activation.
LEAKY_SLOPE = 0.1
#: Expected objects per 416x416 image, the prior behind the objectness bias at start-up.
OBJECTS_PER_IMAGE_PRIOR = 8.0
#: Largest value of ``tw``/``th`` decoded by :meth:`YOLOLayer.decode` (exp(10) ~ 22,000x
#: the anchor): an untrained network must not produce infinite boxes.
MAX_LOG_SCALE = 10.0


class ConvBlock(nn.Module):
    """``[convolutional]``: Conv2d, then BatchNorm2d (``batch_normalize=1``), then activation.

    With batch norm the convolution has no bias (the norm's shift replaces it), which is
    also how Darknet stores the weights.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        pad: bool,
        batch_normalize: bool,
        activation: str,
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 if pad else 0
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, bias=not batch_normalize
        )
        self.bn: Optional[nn.BatchNorm2d] = (
            nn.BatchNorm2d(out_channels) if batch_normalize else None
        )
        if activation == "leaky":
            self.act: nn.Module = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        elif activation == "linear":
            self.act = nn.Identity()
        else:
            raise ValueError(f"unsupported activation {activation!r}; expected leaky or linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)


class DarknetMaxPool(nn.Module):
    """``[maxpool]`` with Darknet's output size ``(W + size - 1 - size) // stride + 1``.

    Darknet pads by ``size - 1`` in all (``(size - 1) // 2`` before, the rest after) and
    ignores the padding when taking the maximum; padding by edge replication gives the
    same maxima. So ``size=2, stride=1`` (in yolov3-tiny) keeps the spatial size.
    """

    def __init__(self, size: int, stride: int) -> None:
        super().__init__()
        before = (size - 1) // 2
        self.padding = (before, size - 1 - before, before, size - 1 - before)
        self.pool = nn.MaxPool2d(size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.padding):
            x = F.pad(x, self.padding, mode="replicate")
        return self.pool(x)


class Route(nn.Module):
    """``[route]``: the channel-wise concatenation of earlier layers' outputs.

    Holds only the absolute indices; :class:`Darknet` supplies the tensors.
    """

    def __init__(self, layers: Sequence[int]) -> None:
        super().__init__()
        self.layers = list(layers)

    def extra_repr(self) -> str:
        return f"layers={self.layers}"


class Shortcut(nn.Module):
    """``[shortcut]``: the previous layer's output plus that of layer ``source``."""

    def __init__(self, source: int) -> None:
        super().__init__()
        self.source = source

    def extra_repr(self) -> str:
        return f"source={self.source}"


class YOLOLayer(nn.Module):
    """``[yolo]``: reshapes a feature map into per-anchor box predictions.

    Args:
        anchors: ``[A, 2]`` anchor widths and heights in input pixels (the ``mask``-selected
            subset of the cfg's anchors).
        num_classes: Number of object classes ``C``.
        stride: Input pixels per cell of this head's grid.

    The anchors are a non-persistent buffer: they follow ``.to(device)`` but are not part
    of the ``state_dict`` (they come from the cfg, never from training).
    """

    anchors: torch.Tensor

    def __init__(self, anchors: torch.Tensor, num_classes: int, stride: int) -> None:
        super().__init__()
        self.register_buffer("anchors", anchors.float().reshape(-1, 2), persistent=False)
        self.num_classes = num_classes
        self.stride = stride

    @property
    def num_anchors(self) -> int:
        return int(self.anchors.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, A * (5 + C), H, W]`` -> raw predictions ``[B, A, H, W, 5 + C]``.

        The last axis is ``(tx, ty, tw, th, objectness logit, C class logits)``.
        """
        batch, channels, height, width = x.shape
        per_anchor = 5 + self.num_classes
        if channels != self.num_anchors * per_anchor:
            raise ValueError(
                f"[yolo] with {self.num_anchors} anchors and {self.num_classes} classes needs "
                f"{self.num_anchors * per_anchor} input channels, got {channels}"
            )
        return x.view(batch, self.num_anchors, per_anchor, height, width).permute(0, 1, 3, 4, 2)

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw predictions ``[B, A, H, W, 5 + C]`` -> boxes ``[B, A * H * W, 5 + C]``.

        The last axis becomes ``(cx, cy, w, h, objectness, C class probabilities)``: the
        centre is ``(sigmoid(t_xy) + cell) * stride`` and the size ``exp(t_wh) * anchor``,
        both in input pixels; objectness and class scores are sigmoids in ``[0, 1]``.
        """
        batch, num_anchors, height, width, per_anchor = raw.shape
        ys, xs = torch.meshgrid(
            torch.arange(height, device=raw.device, dtype=raw.dtype),
            torch.arange(width, device=raw.device, dtype=raw.dtype),
            indexing="ij",
        )
        grid = torch.stack((xs, ys), dim=-1)  # [H, W, 2], (x, y) per cell
        anchors = self.anchors.to(raw.dtype).view(1, num_anchors, 1, 1, 2)
        xy = (raw[..., 0:2].sigmoid() + grid) * self.stride
        wh = raw[..., 2:4].clamp(max=MAX_LOG_SCALE).exp() * anchors
        scores = raw[..., 4:].sigmoid()
        return torch.cat((xy, wh, scores), dim=-1).reshape(batch, -1, per_anchor)

    def extra_repr(self) -> str:
        anchors = [tuple(int(v) for v in a) for a in self.anchors.tolist()]
        return f"anchors={anchors}, num_classes={self.num_classes}, stride={self.stride}"


class Darknet(nn.Module):
    """A detection network built from a Darknet ``.cfg`` file.

    ``forward(images)`` takes float images ``[B, channels, H, W]`` with values in
    ``[0, 1]`` (``H`` and ``W`` multiples of :attr:`max_stride`) and returns one raw
    prediction tensor ``[B, A, H / stride, W / stride, 5 + C]`` per ``[yolo]`` layer, in
    cfg order (what :func:`fedml_api.model.YOLOv3.loss.yolo_loss` takes);
    :meth:`predict` decodes them into boxes.

    Attributes:
        cfg_path: The file the network was built from.
        input_size: ``(height, width)`` from ``[net]``; the size the cfg was designed for,
            any multiple of :attr:`max_stride` works.
        in_channels: Input channels from ``[net]``.
        num_classes: Classes of the ``[yolo]`` layers (they must agree).
        yolo_layers: The detection heads, in cfg order.
        max_stride: The largest downsampling factor in the network.
    """

    def __init__(self, cfg_path: PathLike) -> None:
        super().__init__()
        sections = parse_cfg(cfg_path)
        net, layers = sections[0], sections[1:]
        self.cfg_path = str(cfg_path)
        self.input_size = (net.get_int("height", 416), net.get_int("width", 416))
        self.in_channels = net.get_int("channels", 3)
        self.module_list = nn.ModuleList()
        channels: List[int] = []  # output channels of every layer
        strides: List[int] = []  # downsampling factor of every layer's output
        for index, section in enumerate(layers):
            in_channels = channels[-1] if channels else self.in_channels
            in_stride = strides[-1] if strides else 1
            module, out_channels, out_stride = self._build_layer(
                section, index, in_channels, in_stride, channels, strides
            )
            self.module_list.append(module)
            channels.append(out_channels)
            strides.append(out_stride)
        self.yolo_layers: List[YOLOLayer] = [
            m for m in self.module_list if isinstance(m, YOLOLayer)
        ]
        if not self.yolo_layers:
            raise ValueError(f"{cfg_path}: defines no [yolo] layer")
        class_counts = {layer.num_classes for layer in self.yolo_layers}
        if len(class_counts) != 1:
            raise ValueError(f"{cfg_path}: [yolo] layers disagree on classes: {sorted(class_counts)}")
        self.num_classes = class_counts.pop()
        self.max_stride = max(strides)
        # Outputs that a later [route] or [shortcut] reads are kept during forward().
        self._kept: Set[int] = set()
        for module in self.module_list:
            if isinstance(module, Route):
                self._kept.update(module.layers)
            elif isinstance(module, Shortcut):
                self._kept.add(module.source)
        self._check_heads_and_init_biases()

    def _build_layer(
        self,
        section: CfgSection,
        index: int,
        in_channels: int,
        in_stride: int,
        channels: Sequence[int],
        strides: Sequence[int],
    ) -> Tuple[nn.Module, int, int]:
        """One cfg section -> (module, output channels, output stride)."""
        kind = section.type
        if kind == "convolutional":
            filters = section.get_int("filters")
            size = section.get_int("size", 1)
            stride = section.get_int("stride", 1)
            module = ConvBlock(
                in_channels,
                filters,
                size,
                stride,
                pad=bool(section.get_int("pad", 0)),
                batch_normalize=bool(section.get_int("batch_normalize", 0)),
                activation=section.get_str("activation", "logistic"),
            )
            return module, filters, in_stride * stride
        if kind == "maxpool":
            stride = section.get_int("stride", 1)
            return DarknetMaxPool(section.get_int("size", stride), stride), in_channels, in_stride * stride
        if kind == "upsample":
            stride = section.get_int("stride", 2)
            if in_stride % stride:
                raise ValueError(
                    f"{section.where} [upsample]: stride {stride} does not divide the input's "
                    f"downsampling factor {in_stride}"
                )
            return nn.Upsample(scale_factor=stride, mode="nearest"), in_channels, in_stride // stride
        if kind == "route":
            sources = [self._absolute(section, i, index) for i in section.get_ints("layers")]
            if len({strides[s] for s in sources}) != 1:
                raise ValueError(
                    f"{section.where} [route]: layers {sources} have different resolutions "
                    f"(strides {[strides[s] for s in sources]})"
                )
            return Route(sources), sum(channels[s] for s in sources), strides[sources[0]]
        if kind == "shortcut":
            source = self._absolute(section, section.get_int("from"), index)
            if section.get_str("activation", "linear") != "linear":
                raise ValueError(f"{section.where} [shortcut]: only activation=linear is supported")
            if channels[source] != in_channels or strides[source] != in_stride:
                raise ValueError(
                    f"{section.where} [shortcut]: layer {source} ({channels[source]} channels, "
                    f"stride {strides[source]}) cannot be added to layer {index - 1} "
                    f"({in_channels} channels, stride {in_stride})"
                )
            return Shortcut(source), in_channels, in_stride
        if kind == "yolo":
            anchor_values = section.get_ints("anchors")
            if len(anchor_values) % 2:
                raise ValueError(f"{section.where} [yolo]: anchors must be width,height pairs")
            all_anchors = torch.tensor(anchor_values, dtype=torch.float32).view(-1, 2)
            mask = section.get_ints("mask") if "mask" in section.options else list(range(len(all_anchors)))
            if any(not 0 <= m < len(all_anchors) for m in mask):
                raise ValueError(
                    f"{section.where} [yolo]: mask {mask} selects anchors outside 0..{len(all_anchors) - 1}"
                )
            num_classes = section.get_int("classes")
            if num_classes < 1:
                raise ValueError(f"{section.where} [yolo]: classes must be >= 1, got {num_classes}")
            return YOLOLayer(all_anchors[mask], num_classes, in_stride), in_channels, in_stride
        raise ValueError(
            f"{section.where}: unsupported layer type [{kind}]; expected convolutional, "
            "maxpool, upsample, route, shortcut or yolo"
        )

    @staticmethod
    def _absolute(section: CfgSection, reference: int, index: int) -> int:
        """A layer reference (negative: relative to layer ``index``) as an absolute index."""
        absolute = index + reference if reference < 0 else reference
        if not 0 <= absolute < index:
            raise ValueError(
                f"{section.where} [{section.type}]: layer {index} refers to layer {reference}, "
                f"which is not an earlier layer"
            )
        return absolute

    def _check_heads_and_init_biases(self) -> None:
        """Check each head's input convolution and set its bias to sensible priors.

        Every ``[yolo]`` layer must follow a ``[convolutional]`` without batch norm whose
        ``filters`` are ``A * (5 + C)``. Its objectness biases start at the log-odds of
        :data:`OBJECTS_PER_IMAGE_PRIOR` objects spread over the head's cells at the cfg's
        input size, and its class biases at the log-odds of ``1 / C``, so an untrained
        network neither floods the image with confident boxes nor starts its loss far
        from the data (Lin et al., 2017, section 3.3). Darknet weights overwrite both.
        """
        for index, module in enumerate(self.module_list):
            if not isinstance(module, YOLOLayer):
                continue
            previous = self.module_list[index - 1] if index else None
            expected = module.num_anchors * (5 + module.num_classes)
            if not isinstance(previous, ConvBlock) or previous.bn is not None:
                raise ValueError(
                    f"{self.cfg_path}: the [yolo] layer {index} must follow a [convolutional] "
                    "layer without batch_normalize"
                )
            if previous.conv.out_channels != expected:
                raise ValueError(
                    f"{self.cfg_path}: layer {index - 1} has filters={previous.conv.out_channels}, "
                    f"but the [yolo] layer after it needs {module.num_anchors} anchors x "
                    f"(5 + {module.num_classes} classes) = {expected}"
                )
            cells = (self.input_size[0] / module.stride) * (self.input_size[1] / module.stride)
            objectness = min(OBJECTS_PER_IMAGE_PRIOR / cells, 0.5)
            bias = previous.conv.bias.detach().view(module.num_anchors, -1)
            bias[:, 4] = math.log(objectness / (1 - objectness))
            bias[:, 5:] = math.log(1 / max(module.num_classes - 1, 1))

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        """``[B, channels, H, W]`` in ``[0, 1]`` -> raw predictions, one per ``[yolo]``."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images [B, {self.in_channels}, H, W], got {list(images.shape)}"
            )
        height, width = images.shape[-2:]
        if height % self.max_stride or width % self.max_stride:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of the network's stride "
                f"{self.max_stride} (e.g. --img_size {max(1, round(height / self.max_stride)) * self.max_stride})"
            )
        kept = {}
        raw_outputs: List[torch.Tensor] = []
        x = images
        for index, module in enumerate(self.module_list):
            if isinstance(module, Route):
                x = torch.cat([kept[i] for i in module.layers], dim=1)
            elif isinstance(module, Shortcut):
                x = x + kept[module.source]
            elif isinstance(module, YOLOLayer):
                raw_outputs.append(module(x))  # a head passes its input through unchanged
            else:
                x = module(x)
            if index in self._kept:
                kept[index] = x
        return raw_outputs

    def decode(self, raw_outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw outputs of :meth:`forward` -> boxes ``[B, N, 5 + C]`` (see :meth:`YOLOLayer.decode`)."""
        return torch.cat(
            [layer.decode(raw) for layer, raw in zip(self.yolo_layers, raw_outputs)], dim=1
        )

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded boxes ``[B, N, 5 + C]`` of ``images``: ``(cx, cy, w, h)`` in input
        pixels, objectness, class probabilities; ``N`` sums ``A * H * W`` over the heads."""
        return self.decode(self.forward(images))
