"""Geometry and colour transforms for detection images and their boxes.

Images are uint8 ``[H, W, 3]`` RGB numpy arrays until they are placed on the square
network input (the "canvas"); boxes are float32 ``[N, 4]`` ``(x1, y1, x2, y2)`` in pixels
of the image they belong to. Every geometric transform moves the boxes with the pixels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Tuple, Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

PathLike = Union[str, os.PathLike]

#: Grey of the padding around a letterboxed image (as in Darknet and ultralytics).
PAD_VALUE = 114
#: A box cropped by the canvas edge is kept if at least this share of its area remains...
MIN_VISIBLE_AREA = 0.2
#: ...and if it is still at least this many pixels wide and high.
MIN_BOX_PIXELS = 2.0


def load_resized(path: PathLike, long_side: int) -> np.ndarray:
    """Read an image as RGB and resize it so that its longer side is ``long_side`` pixels.

    JPEG files are decoded at a reduced scale when that still gives at least the requested
    size (PIL's ``draft``), which makes small network inputs much cheaper to read. The
    aspect ratio is kept (each side rounded to the nearest pixel, at least 1).

    Returns:
        uint8 ``[h, w, 3]`` with ``max(h, w) == long_side``.
    """
    with Image.open(path) as image:
        ratio = long_side / max(image.size)
        size = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
        image.draft("RGB", size)
        image = image.convert("RGB")
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8).copy()


def normalized_to_pixel_boxes(boxes_cxcywh: np.ndarray, width: int, height: int) -> np.ndarray:
    """``[N, 4]`` ``(cx, cy, w, h)`` in ``[0, 1]`` of the image -> ``(x1, y1, x2, y2)`` pixels."""
    scale = np.array([width, height, width, height], dtype=np.float32)
    cx, cy, w, h = np.asarray(boxes_cxcywh, dtype=np.float32).T
    return np.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), axis=1) * scale


def place_on_canvas(
    image: np.ndarray,
    boxes: np.ndarray,
    canvas_size: int,
    scale: float,
    offset: Tuple[int, int],
    min_box_pixels: float = MIN_BOX_PIXELS,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resize ``image`` by ``scale`` and paste it onto a grey square canvas at ``offset``.

    Args:
        image: uint8 ``[h, w, 3]``.
        boxes: ``[N, 4]`` pixel boxes of ``image``.
        canvas_size: Side ``S`` of the square canvas.
        scale: Resize factor (each side rounded to the nearest pixel, at least 1).
        offset: ``(x, y)`` canvas position of the resized image's top-left corner; parts
            outside the canvas are cut off.
        min_box_pixels: Boxes narrower or lower than this on the canvas are dropped.

    Returns:
        ``(canvas uint8 [S, S, 3], boxes [K, 4] on the canvas, kept)`` where ``kept`` is a
        bool ``[N]`` mask of the boxes that remain visible enough (at least
        :data:`MIN_VISIBLE_AREA` of their area and ``min_box_pixels`` wide and high).
    """
    height, width = image.shape[:2]
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = np.asarray(
            Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
        )
    canvas = np.full((canvas_size, canvas_size, 3), PAD_VALUE, dtype=np.uint8)
    dx, dy = offset
    x0, y0 = max(dx, 0), max(dy, 0)
    x1, y1 = min(dx + new_w, canvas_size), min(dy + new_h, canvas_size)
    if x1 > x0 and y1 > y0:
        canvas[y0:y1, x0:x1] = image[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
    factor = np.array([new_w / width, new_h / height] * 2, dtype=np.float32)
    moved = boxes.astype(np.float32).reshape(-1, 4) * factor + np.array([dx, dy, dx, dy], np.float32)
    clipped = moved.clip(0, canvas_size)
    area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
    widths, heights = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    kept = (
        (widths >= min_box_pixels)
        & (heights >= min_box_pixels)
        & (widths * heights >= MIN_VISIBLE_AREA * np.maximum(area, 1e-9))
    )
    return canvas, clipped[kept], kept


def letterbox(
    image: np.ndarray, boxes: np.ndarray, canvas_size: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit ``image`` into a square canvas without distortion: scaled so its longer side is
    ``canvas_size``, centred, padded with grey. Returns what :func:`place_on_canvas` does.

    Nothing is cut off, and every box is kept however small it becomes: evaluation must
    count every ground-truth object."""
    height, width = image.shape[:2]
    scale = canvas_size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    offset = ((canvas_size - new_w) // 2, (canvas_size - new_h) // 2)
    return place_on_canvas(image, boxes, canvas_size, scale, offset, min_box_pixels=0.0)


def flip_horizontal(canvas: np.ndarray, boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mirror a canvas ``[S, S, 3]`` and its pixel boxes left to right."""
    size = canvas.shape[1]
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = size - boxes[:, 2], size - boxes[:, 0]
    return np.ascontiguousarray(canvas[:, ::-1]), flipped


def jitter_hsv(canvas: torch.Tensor, hue: float, saturation: float, value: float) -> torch.Tensor:
    """Shift the hue by ``hue`` (a fraction of the colour circle, in ``[-0.5, 0.5]``) and
    multiply saturation and brightness by ``saturation`` and ``value``.

    ``canvas`` is uint8 ``[3, S, S]``; returns a new uint8 tensor of the same shape.
    """
    if hue:
        canvas = TF.adjust_hue(canvas, hue)
    if saturation != 1.0:
        canvas = TF.adjust_saturation(canvas, saturation)
    if value != 1.0:
        canvas = TF.adjust_brightness(canvas, value)
    return canvas


@dataclass(frozen=True)
class DetectionAugmentation:
    """Random training augmentation: scale, translation, left-right flip and HSV jitter.

    The random draws come from torch's global CPU generator, so a run seeded with
    ``torch.manual_seed`` is reproducible.

    Attributes:
        scale: The image is resized by a factor drawn from ``[1 - scale, 1 + scale]``
            relative to the letterbox size (``0`` disables it).
        translate: Its centre moves by up to ``translate * S`` pixels in x and y.
        flip: Probability of a left-right mirror.
        hsv_h: Hue shift drawn from ``[-hsv_h, hsv_h]`` (fraction of the colour circle).
        hsv_s: Saturation gain drawn from ``[1 - hsv_s, 1 + hsv_s]``.
        hsv_v: Brightness gain drawn from ``[1 - hsv_v, 1 + hsv_v]``.
    """

    scale: float = 0.25
    translate: float = 0.1
    flip: float = 0.5
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4

    def __post_init__(self) -> None:
        for name in ("scale", "translate", "flip", "hsv_s", "hsv_v"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augmentation {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.hsv_h <= 0.5:
            raise ValueError(f"augmentation hsv_h must be in [0, 0.5], got {self.hsv_h}")

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, canvas_size: int
    ) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Augment one image onto a ``canvas_size`` square.

        Args:
            image: uint8 ``[h, w, 3]``, already resized so its longer side is ``canvas_size``.
            boxes: ``[N, 4]`` pixel boxes of ``image``.

        Returns:
            ``(canvas uint8 [3, S, S], boxes [K, 4], kept bool [N])``.
        """
        draws = torch.rand(7).tolist()
        height, width = image.shape[:2]
        scale = 1.0 + self.scale * (2 * draws[0] - 1)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        shift_x = self.translate * canvas_size * (2 * draws[1] - 1)
        shift_y = self.translate * canvas_size * (2 * draws[2] - 1)
        offset = (
            math.floor((canvas_size - new_w) / 2 + shift_x),
            math.floor((canvas_size - new_h) / 2 + shift_y),
        )
        canvas, boxes, kept = place_on_canvas(image, boxes, canvas_size, scale, offset)
        if draws[3] < self.flip:
            canvas, boxes = flip_horizontal(canvas, boxes)
        tensor = torch.from_numpy(canvas).permute(2, 0, 1).contiguous()
        tensor = jitter_hsv(
            tensor,
            hue=self.hsv_h * (2 * draws[4] - 1),
            saturation=1.0 + self.hsv_s * (2 * draws[5] - 1),
            value=1.0 + self.hsv_v * (2 * draws[6] - 1),
        )
        return tensor, boxes, kept
