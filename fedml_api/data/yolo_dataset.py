"""YOLO-format detection datasets: files on disk, labels, and batches for training.

Layout of one dataset folder (a client's ``train`` or ``test`` folder, as written by
``scripts/split_dataset.py --dataset yolo``)::

    <root>/images/<name>.jpg      (also .jpeg, .png, .bmp, .webp; sub-folders allowed)
    <root>/labels/<name>.txt      one line per object: ``class cx cy w h``

``class`` is a 0-based integer; ``cx cy w h`` are the box centre and size as fractions
of the image width and height. An image without a label file, or with an empty one,
has no objects. In general the label file of ``.../images/.../x.jpg`` is
``.../labels/.../x.txt`` (the last ``images`` folder of the path becomes ``labels``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from fedml_api.data.yolo_transforms import (
    DetectionAugmentation,
    letterbox,
    load_resized,
    normalized_to_pixel_boxes,
)

PathLike = Union[str, os.PathLike]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_HOW_TO_CREATE = "create client folders with scripts/split_dataset.py --dataset yolo"
#: Coordinates a little outside [0, 1] (rounding in label converters) are clipped, not rejected.
_COORD_TOLERANCE = 1e-3


def list_images(directory: PathLike) -> List[Path]:
    """The image files under ``directory`` (recursively), sorted by path.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder not found: {directory}")
    return sorted(
        path
        for path in directory.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )


def label_path(image_path: PathLike) -> Path:
    """The label file of an image: the last ``images`` folder in the path becomes
    ``labels`` and the suffix ``.txt``."""
    parts = list(Path(image_path).parts)
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == "images":
            parts[index] = "labels"
            return Path(*parts).with_suffix(".txt")
    raise ValueError(f"{image_path} is not inside an 'images' folder, so it has no label file")


def read_labels(path: PathLike) -> np.ndarray:
    """Read a YOLO label file into float32 ``[N, 5]`` rows ``(class, cx, cy, w, h)``.

    A missing file means no objects (an empty ``[0, 5]`` array).

    Raises:
        ValueError: a line does not hold five numbers, a class is not a non-negative
            integer, or a coordinate is outside ``[0, 1]`` or a size is not positive.
    """
    path = Path(path)
    if not path.exists():
        return np.zeros((0, 5), dtype=np.float32)
    rows = []
    with open(path, encoding="utf-8") as file:
        for line_no, line in enumerate(file, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{line_no}"
            if len(fields) != 5:
                raise ValueError(f"{where}: expected 'class cx cy w h', got {line.strip()!r}")
            try:
                values = [float(v) for v in fields]
            except ValueError:
                raise ValueError(f"{where}: expected five numbers, got {line.strip()!r}") from None
            if values[0] < 0 or values[0] != int(values[0]):
                raise ValueError(f"{where}: class must be a non-negative integer, got {fields[0]!r}")
            coords = values[1:]
            if any(not -_COORD_TOLERANCE <= v <= 1 + _COORD_TOLERANCE for v in coords):
                raise ValueError(f"{where}: coordinates must be fractions in [0, 1], got {coords}")
            if coords[2] <= 0 or coords[3] <= 0:
                raise ValueError(f"{where}: box width and height must be positive, got {coords[2:]}")
            rows.append(values)
    if not rows:
        return np.zeros((0, 5), dtype=np.float32)
    labels = np.array(rows, dtype=np.float32)
    labels[:, 1:] = labels[:, 1:].clip(0.0, 1.0)
    return labels


def count_yolo_images(root: PathLike) -> int:
    """Number of images in ``<root>/images`` (no file is opened)."""
    return len(list_images(_images_dir(root)))


class YoloDataset(Dataset):
    """The images of ``<root>/images`` with their labels, as square network inputs.

    Each item is ``(image, targets)``: ``image`` uint8 ``[3, S, S]`` and ``targets``
    float32 ``[K, 5]`` rows ``(class, cx, cy, w, h)`` in pixels of that image. Without
    ``augmentation`` an image is letterboxed (scaled to fit, centred, padded grey); with
    it, it is placed at a random scale and position and colour-jittered.

    Images are decoded once, at the size needed, and kept in memory (about
    ``3 * S * S`` bytes each), since a federated client reads the same files every round;
    :attr:`nbytes` is what it holds so far. (:class:`fedml_api.model.YOLOv3.YOLOv3Trainer`
    keeps its datasets in the process's client-data cache, under the budget of
    :func:`fedml_api.data.memory_cache.set_cache_budget`.)

    Args:
        root: The dataset folder (see the module docstring).
        image_size: Side ``S`` of the square input, in pixels.
        augmentation: Random training augmentation, or ``None`` for evaluation.
    """

    def __init__(
        self,
        root: PathLike,
        image_size: int,
        augmentation: Optional[DetectionAugmentation] = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.root = Path(root)
        self.image_size = image_size
        self.augmentation = augmentation
        self.image_paths = list_images(_images_dir(root))
        if not self.image_paths:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.root / 'images'}; {_HOW_TO_CREATE}"
            )
        self.labels: List[np.ndarray] = [read_labels(label_path(p)) for p in self.image_paths]
        self._images: List[Optional[np.ndarray]] = [None] * len(self.image_paths)

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def num_objects(self) -> int:
        """Number of labelled objects in the dataset."""
        return sum(len(labels) for labels in self.labels)

    @property
    def nbytes(self) -> int:
        """Memory held by the labels and the images decoded so far (it grows as items are read)."""
        images = sum(image.nbytes for image in self._images if image is not None)
        return images + sum(labels.nbytes for labels in self.labels)

    @property
    def max_class(self) -> int:
        """The largest class id in the labels (-1 when there are no objects)."""
        return max((int(labels[:, 0].max()) for labels in self.labels if len(labels)), default=-1)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image = self._images[index]
        if image is None:
            image = self._images[index] = load_resized(self.image_paths[index], self.image_size)
        labels = self.labels[index]
        height, width = image.shape[:2]
        boxes = normalized_to_pixel_boxes(labels[:, 1:], width, height)
        if self.augmentation is None:
            canvas, boxes, kept = letterbox(image, boxes, self.image_size)
            tensor = torch.from_numpy(canvas).permute(2, 0, 1).contiguous()
        else:
            tensor, boxes, kept = self.augmentation(image, boxes, self.image_size)
        classes = labels[kept, :1]
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        sizes = boxes[:, 2:] - boxes[:, :2]
        targets = np.concatenate((classes, centres, sizes), axis=1).astype(np.float32)
        return tensor, torch.from_numpy(targets)


def collate_detections(
    batch: Sequence[Tuple[torch.Tensor, torch.Tensor]],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch items of :class:`YoloDataset`, which hold different numbers of boxes.

    Returns:
        ``(images uint8 [B, 3, S, S], targets float32 [M, 6])``, each target row being
        ``(index of its image in the batch, class, cx, cy, w, h)`` in input pixels.
    """
    images = torch.stack([image for image, _ in batch])
    targets = [
        torch.cat((torch.full((len(t), 1), float(i)), t), dim=1) for i, (_, t) in enumerate(batch)
    ]
    return images, torch.cat(targets) if targets else torch.zeros((0, 6))


def _images_dir(root: PathLike) -> Path:
    images = Path(root) / "images"
    if not images.is_dir():
        raise FileNotFoundError(
            f"YOLO dataset not found: expected {images}/ with the images and "
            f"{Path(root) / 'labels'}/ with their labels; {_HOW_TO_CREATE}"
        )
    return images
