"""One client's image data on disk (``<directory>/data.h5``) and in memory (:class:`ClientSplit`).

File format, written by :func:`write_client_split` (scripts/split_dataset.py calls it):

* dataset ``images``: uint8 ``[N, H, W, C]`` (NHWC, as the loaders return them);
* dataset ``labels``: int64 ``[N]``;
* attribute ``dataset``: the registry name (see :mod:`fedml_api.data.datasets`);
* attribute ``num_samples``: ``N``, so the FedAvg weight is known without reading the images.

:func:`load_client_split` keeps what it reads in the process's client-data cache, a least
recently used cache bounded by a memory budget: :func:`set_cache_budget` (``None``, the
default, unbounded; ``0``, no caching; else a number of bytes), :func:`cache_info` and
:func:`clear_cache` (defined in :mod:`fedml_api.data.memory_cache`, which also holds the
YOLO datasets under the same budget).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from fedml_api.data.memory_cache import CLIENT_DATA_CACHE, cache_info, clear_cache, set_cache_budget

__all__ = [
    "ClientSplit",
    "DATA_FILE",
    "cache_info",
    "clear_cache",
    "count_client_samples",
    "load_client_split",
    "set_cache_budget",
    "write_client_split",
]

PathLike = Union[str, os.PathLike]

DATA_FILE = "data.h5"
_HOW_TO_CREATE = "create the per-client folders with scripts/split_dataset.py"


@dataclass(frozen=True)
class ClientSplit:
    """A client's train or test data, ready for batching.

    Attributes:
        images: uint8 ``[N, C, H, W]``, contiguous. Shared through the per-process cache of
            :func:`load_client_split`: index into it, never modify it in place.
        labels: int64 ``[N]``.
        dataset: Registry name of the dataset the images come from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    dataset: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory held by the tensors (what the cache counts against its budget)."""
        return int(self.images.nbytes + self.labels.nbytes)


def write_client_split(
    directory: PathLike, images: np.ndarray, labels: np.ndarray, dataset_name: str
) -> Path:
    """Write ``<directory>/data.h5`` (creating ``directory``) and return its path.

    Args:
        directory: The client's ``train`` or ``test`` folder.
        images: uint8 ``[N, H, W, C]`` with ``N >= 1``.
        labels: Integer ``[N]``; stored as int64.
        dataset_name: Registry name stored with the data.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be uint8 [N, H, W, C], got {images.dtype} {list(images.shape)}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got {labels.dtype} {list(labels.shape)}"
        )
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"refusing to write an empty client split to {directory}")
    path = Path(directory) / DATA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed, so an interrupted split never leaves a
    # truncated data.h5 that a client would later try to read.
    partial = path.with_name(DATA_FILE + ".partial")
    h5py = _h5py()
    with h5py.File(partial, "w") as file:
        file.create_dataset("images", data=np.ascontiguousarray(images))
        file.create_dataset("labels", data=labels.astype(np.int64))
        file.attrs["dataset"] = dataset_name
        file.attrs["num_samples"] = len(labels)
    os.replace(partial, path)
    return path


def load_client_split(directory: PathLike) -> ClientSplit:
    """Load ``<directory>/data.h5``, through the process's client-data cache.

    The result is cached by absolute path, so a client that trains every round reads its
    file once while it stays cached: always with the default budget (``None``, unbounded,
    for one client per process); with a budget (:func:`set_cache_budget`), as long as it is
    among the most recently used splits that fit in it. A file rewritten since it was
    cached (different mtime or size) is read again.

    Safe to call from several threads (a prefetching one, say); two threads loading the
    same uncached split both read it.

    Raises:
        FileNotFoundError: there is no ``data.h5`` in ``directory``.
        ValueError: the file is not in the format described in the module docstring.
    """
    path = _data_file(directory)
    key = ("client_split", str(path.resolve()))
    stat = path.stat()
    signature = (stat.st_mtime_ns, stat.st_size)
    cached = CLIENT_DATA_CACHE.get(key, version=signature)
    if cached is not None:
        return cached
    h5py = _h5py()
    with h5py.File(path, "r") as file:
        try:
            images = file["images"][()]
            labels = file["labels"][()]
            dataset = file.attrs["dataset"]
        except KeyError as error:
            raise ValueError(
                f"{path} is not a client split: expected datasets 'images' and 'labels' and "
                f"attribute 'dataset' ({error}); {_HOW_TO_CREATE}"
            ) from error
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (len(images),):
        raise ValueError(
            f"{path}: expected uint8 images [N, H, W, C] and N labels, got images "
            f"{images.dtype} {list(images.shape)} and labels {list(labels.shape)}"
        )
    split = ClientSplit(
        # NHWC on disk (the loaders' layout) -> NCHW for torch, made contiguous once here
        # rather than in every batch.
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.from_numpy(labels.astype(np.int64)),
        dataset=dataset.decode() if isinstance(dataset, bytes) else str(dataset),
    )
    CLIENT_DATA_CACHE.put(key, split, split.nbytes, version=signature)
    return split


def count_client_samples(directory: PathLike) -> int:
    """Number of samples in ``<directory>/data.h5``, read from its attribute (no image I/O)."""
    path = _data_file(directory)
    h5py = _h5py()
    with h5py.File(path, "r") as file:
        if "num_samples" not in file.attrs:
            raise ValueError(f"{path} has no 'num_samples' attribute; {_HOW_TO_CREATE}")
        return int(file.attrs["num_samples"])


def _h5py():
    """h5py, imported on first use (0.2 s): the server and the launcher's pre-flight
    check import this module but never read data."""
    import h5py

    return h5py


def _data_file(directory: PathLike) -> Path:
    path = Path(directory) / DATA_FILE
    if not path.is_file():
        missing = path if Path(directory).is_dir() else Path(directory)
        raise FileNotFoundError(
            f"client data not found: {missing} does not exist; {_HOW_TO_CREATE}"
        )
    return path
