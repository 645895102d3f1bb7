"""Read CIFAR-10 from the files users actually have, without extracting archives to disk.

Two layouts are understood, each either as a tar archive (any compression ``tarfile``
detects) or as an extracted directory:

* the official python version, ``cifar-10-python.tar.gz`` as torchvision downloads it:
  ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` and ``test_batch``, pickled
  dicts with ``data`` (uint8 ``[10000, 3072]``, channel-major rows) and ``labels``;
* an image-folder layout, ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (also
  ``.jpeg`` / ``.png``), optionally under one top-level folder.

Every loader returns ``(train_images, train_labels, test_images, test_labels)`` with
images as uint8 ``[N, 32, 32, 3]`` (NHWC) and labels as int64 ``[N]``.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
from PIL import Image

PathLike = Union[str, os.PathLike]
CifarArrays = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

#: Label order 0..9, shared by the official batches and the image-folder layout.
CIFAR10_CLASSES: Tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_IMAGE_SHAPE = (32, 32, 3)
_BATCH_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_BATCH_FILES = frozenset((*_TRAIN_BATCHES, _TEST_BATCH))
_SPLITS = ("train", "test")
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
_LAYOUTS_HELP = (
    "expected cifar-10-python.tar.gz (cifar-10-batches-py/data_batch_1..5, test_batch), "
    "the extracted cifar-10-batches-py directory or a directory containing it, or an "
    "image-folder layout train/<class>/*.jpg + test/<class>/*.jpg as a .tar.gz or a directory"
)

# (path parts relative to the layout root, callable returning the file's bytes)
_Entry = Tuple[Tuple[str, ...], Callable[[], bytes]]


def load_cifar10(source: PathLike) -> CifarArrays:
    """Load all 60,000 CIFAR-10 images from an archive or directory (see module docstring).

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: uint8 ``[50000, 32, 32, 3]``,
        int64 ``[50000]``, uint8 ``[10000, 32, 32, 3]``, int64 ``[10000]`` for the full dataset.
        Image-folder samples are ordered by class, then file name, whatever the archive order.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` is in neither layout, or a file in it is malformed.

    The official batches are pickles: only load archives from a source you trust
    (torchvision has the same caveat).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_entries(_directory_entries(path), path)
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise ValueError(
                f"CIFAR-10 source {path} is a file but not a tar archive; {_LAYOUTS_HELP}"
            )
        return _read_entries(_tar_entries(path), path)
    raise FileNotFoundError(f"CIFAR-10 source {path} does not exist; {_LAYOUTS_HELP}")


def download_cifar10(root: PathLike) -> Path:
    """Download the official ``cifar-10-python.tar.gz`` into ``root`` and return its path.

    A copy already in ``root`` whose checksum matches is reused. Pass the returned path to
    :func:`load_cifar10`.

    Raises:
        RuntimeError: the download failed (typically: this machine is offline).
    """
    # Imported here: only this function needs torchvision, and it costs ~1 s per process.
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_url

    root = Path(root).expanduser()
    try:
        download_url(CIFAR10.url, str(root), CIFAR10.filename, CIFAR10.tgz_md5)
    except OSError as error:  # urllib's URLError (no network, DNS, HTTP) is an OSError
        raise RuntimeError(
            f"could not download CIFAR-10 from {CIFAR10.url} into {root} ({error}); this machine "
            f"may be offline: get {CIFAR10.filename} elsewhere and pass its path as the source "
            "(--source for scripts/split_dataset.py)"
        ) from error
    return root / CIFAR10.filename


def _tar_entries(path: Path) -> Iterator[_Entry]:
    with tarfile.open(path) as archive:
        for member in archive:
            if member.isfile():
                yield PurePosixPath(member.name).parts, partial(_read_member, archive, member)


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    assert handle is not None, "regular tar members always have a file object"
    with handle:
        return handle.read()


def _directory_entries(path: Path) -> Iterator[_Entry]:
    """Yield the files of the one layout found in ``path`` or in one of its subdirectories."""
    kind, root = _find_layout_root(path)
    if kind == "batches":
        for name in sorted(_BATCH_FILES):
            file = root / name
            if file.is_file():
                yield (_BATCH_DIR, name), file.read_bytes
        return
    for split in _SPLITS:
        for class_dir in sorted((root / split).iterdir()):
            if class_dir.is_dir():
                for file in sorted(class_dir.iterdir()):
                    if file.is_file():
                        yield (split, class_dir.name, file.name), file.read_bytes


def _find_layout_root(path: Path) -> Tuple[str, Path]:
    """Return ("batches" | "images", directory) for ``path`` itself or its one matching child.

    Only one level down is searched: scanning a whole data directory could be very slow.
    """

    def layout_of(directory: Path) -> Optional[str]:
        if any((directory / name).is_file() for name in _BATCH_FILES):
            return "batches"
        if all((directory / split).is_dir() for split in _SPLITS):
            return "images"
        return None

    kind = layout_of(path)
    if kind is not None:
        return kind, path
    matches: List[Tuple[str, Path]] = []
    for child in sorted(path.iterdir()):
        if child.is_dir() and not _is_hidden(child.name):
            child_kind = layout_of(child)
            if child_kind is not None:
                matches.append((child_kind, child))
    if len(matches) == 1:
        return matches[0]
    if matches:
        found = ", ".join(str(child) for _, child in matches)
        raise ValueError(
            f"CIFAR-10 source {path} holds several datasets ({found}); pass one of them"
        )
    raise ValueError(f"CIFAR-10 source {path}: no CIFAR-10 files found; {_LAYOUTS_HELP}")


def _is_hidden(part: str) -> bool:
    # Dot files and macOS archive debris (".DS_Store", "._x.jpg", "__MACOSX/") are never data.
    return part.startswith(".") or part == "__MACOSX"


def _read_entries(entries: Iterable[_Entry], source: Path) -> CifarArrays:
    """Sort the entries into the two layouts, then build the arrays of the one present."""
    batches: Dict[str, bytes] = {}
    folder = _ImageFolder(source)
    for parts, read in entries:
        if any(_is_hidden(part) for part in parts):
            continue
        if len(parts) >= 2 and parts[-2] == _BATCH_DIR and parts[-1] in _BATCH_FILES:
            batches[parts[-1]] = read()
        elif (
            len(parts) >= 3
            and parts[-3] in _SPLITS
            and PurePosixPath(parts[-1]).suffix.lower() in _IMAGE_SUFFIXES
        ):
            folder.add(parts, read())
    if batches and folder.num_images:
        raise ValueError(
            f"CIFAR-10 source {source} mixes the official batches and an image folder; "
            "pass an archive or directory holding only one of them"
        )
    if batches:
        return _arrays_from_batches(batches, source)
    if folder.num_images:
        return folder.arrays()
    raise ValueError(f"CIFAR-10 source {source}: no CIFAR-10 files found; {_LAYOUTS_HELP}")


def _arrays_from_batches(batches: Mapping[str, bytes], source: Path) -> CifarArrays:
    missing = sorted(_BATCH_FILES - batches.keys())
    if missing:
        raise ValueError(f"CIFAR-10 source {source}: {_BATCH_DIR} is missing {', '.join(missing)}")
    train = [_unpickle_batch(batches[name], name) for name in _TRAIN_BATCHES]
    test_rows, test_labels = _unpickle_batch(batches[_TEST_BATCH], _TEST_BATCH)
    return (
        _rows_to_nhwc(np.concatenate([rows for rows, _ in train])),
        np.concatenate([labels for _, labels in train]),
        _rows_to_nhwc(test_rows),
        test_labels,
    )


def _rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
    """uint8 [N, 3072] channel-major rows (1024 red, 1024 green, 1024 blue values, each a
    row-major 32x32 plane) -> contiguous uint8 [N, 32, 32, 3]."""
    height, width, channels = _IMAGE_SHAPE
    return np.ascontiguousarray(rows.reshape(-1, channels, height, width).transpose(0, 2, 3, 1))


def _unpickle_batch(data: bytes, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """One official batch -> (uint8 [N, 3072] rows, int64 [N] labels)."""
    # The batches were pickled by Python 2; latin1 maps its str bytes 1:1, as torchvision does.
    batch = pickle.loads(data, encoding="latin1")
    if not isinstance(batch, dict):
        raise ValueError(
            f"{_BATCH_DIR}/{name}: expected a pickled dict, got {type(batch).__name__}"
        )
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(
            f"{_BATCH_DIR}/{name}: expected keys 'data' and 'labels', "
            f"found {sorted(map(str, batch))}"
        )
    pixels = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    row_length = int(np.prod(_IMAGE_SHAPE))
    if pixels.ndim != 2 or pixels.shape[1] != row_length or len(labels) != len(pixels):
        raise ValueError(
            f"{_BATCH_DIR}/{name}: expected data [N, {row_length}] and N labels, "
            f"got data {list(pixels.shape)} and {len(labels)} labels"
        )
    _check_labels(labels, f"{_BATCH_DIR}/{name}")
    return pixels, labels


def _check_labels(labels: np.ndarray, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise ValueError(
            f"{where}: labels must be 0..{len(CIFAR10_CLASSES) - 1}, "
            f"found {labels.min()}..{labels.max()}"
        )


class _ImageFolder:
    """Collects decoded ``<prefix>/<split>/<class>/<file>`` images as they stream past."""

    def __init__(self, source: Path) -> None:
        self._source = source
        self._prefix: Optional[Tuple[str, ...]] = None
        # split -> [(label, file name, image [32, 32, 3])]
        self._images: Dict[str, List[Tuple[int, str, np.ndarray]]] = {
            split: [] for split in _SPLITS
        }

    @property
    def num_images(self) -> int:
        return sum(len(items) for items in self._images.values())

    def add(self, parts: Tuple[str, ...], data: bytes) -> None:
        *prefix, split, class_name, file_name = parts
        if self._prefix is None:
            self._prefix = tuple(prefix)
        elif tuple(prefix) != self._prefix:
            raise ValueError(
                f"CIFAR-10 source {self._source}: image folders under both "
                f"{'/'.join(self._prefix) or '.'} and {'/'.join(prefix) or '.'}; expected one "
                "train/ and one test/ folder"
            )
        relative = "/".join(parts)
        if class_name not in CIFAR10_CLASSES:
            raise ValueError(
                f"CIFAR-10 source {self._source}: unknown class folder {relative!r}; "
                f"expected one of {', '.join(CIFAR10_CLASSES)}"
            )
        image = _decode_image(data, f"{self._source}: {relative}")
        self._images[split].append((CIFAR10_CLASSES.index(class_name), file_name, image))

    def arrays(self) -> CifarArrays:
        arrays: List[np.ndarray] = []
        for split in _SPLITS:
            items = sorted(self._images[split], key=lambda item: item[:2])
            if not items:
                raise ValueError(
                    f"CIFAR-10 source {self._source}: no images in the {split}/ folder"
                )
            arrays.append(np.stack([image for _, _, image in items]))
            arrays.append(np.array([label for label, _, _ in items], dtype=np.int64))
        train_images, train_labels, test_images, test_labels = arrays
        return train_images, train_labels, test_images, test_labels


def _decode_image(data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes -> uint8 [32, 32, 3] RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    except OSError as error:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise ValueError(f"{name}: cannot decode image ({error})") from error
    if array.shape != _IMAGE_SHAPE:
        height, width = array.shape[:2]
        raise ValueError(f"{name}: expected a 32x32 image, got {width}x{height}")
    return array
