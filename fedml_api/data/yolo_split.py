"""Splitting a YOLO-format dataset into per-client folders.

The source is an ultralytics-style dataset: a root folder (or a ``.tar.gz`` of one)
with ``images/<subset>/`` and ``labels/<subset>/``, and usually a ``<name>.yaml`` naming
the ``train`` and ``val`` image folders, e.g. coco128::

    coco128/coco128.yaml            train: images/train2017, val: images/val2017
    coco128/images/train2017/*.jpg
    coco128/labels/train2017/*.txt  ...

Client ``i`` (1..N) receives ``<out>/<i>/train/{images,labels}/`` and
``<out>/<i>/test/{images,labels}/`` (see :mod:`fedml_api.data.yolo_dataset`), with the
files copied, so each client folder can be moved to its own host.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import yaml

from fedml_api.data.partition import partition_train_and_test
from fedml_api.data.yolo_dataset import label_path, list_images, read_labels

PathLike = Union[str, os.PathLike]

#: Label of an image without objects for the class-skewed partition.
NO_OBJECT = -1


@dataclass(frozen=True)
class YoloClientCounts:
    """What was written for one client."""

    client_id: int
    train_images: int
    train_objects: int
    train_classes: int  # distinct classes among the training objects
    test_images: int
    test_objects: int
    top_classes: Tuple[int, ...]  # the most frequent training classes, most frequent first


@contextlib.contextmanager
def open_yolo_source(source: PathLike) -> Iterator[Path]:
    """Yield the root folder of a YOLO dataset given as a folder or a ``.tar.gz``/``.tgz``.

    An archive is extracted into a temporary folder, removed on exit. The root is the
    folder that holds ``images/``: ``source`` itself or one level below it (archives
    usually hold a single top folder such as ``coco128/``).
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"YOLO dataset source not found: {source}")
    if source.is_dir():
        yield _dataset_root(source)
        return
    if not source.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise ValueError(f"--source {source}: expected a folder or a .tar.gz archive of a YOLO dataset")
    with tempfile.TemporaryDirectory(prefix="yolo_source_") as tmp:
        with tarfile.open(source) as archive:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4, 3.10.12, 3.9.17
                archive.extractall(tmp, filter="data")
            else:
                archive.extractall(tmp)
        yield _dataset_root(Path(tmp))


def find_subsets(
    root: Path, train: Optional[str] = None, test: Optional[str] = None
) -> Tuple[Path, Path]:
    """The train and test image folders of the dataset at ``root``.

    ``train``/``test`` (paths relative to ``root``) override the ``train``/``val`` entries
    of the dataset's YAML file (the single ``*.yaml`` in ``root``), which are also read
    relative to ``root``.
    """
    if train is None or test is None:
        spec = _read_dataset_yaml(root)
        train = train if train is not None else spec.get("train")
        test = test if test is not None else spec.get("val", spec.get("test"))
        if train is None or test is None:
            raise ValueError(
                f"the dataset YAML in {root} does not name both 'train' and 'val' image folders; "
                "pass --yolo_train and --yolo_test"
            )
    folders = []
    for name in (train, test):
        folder = root / str(name)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} not found (from {name!r})")
        folders.append(folder)
    return folders[0], folders[1]


def dominant_class(labels: np.ndarray) -> int:
    """The most frequent class of an image's ``[N, 5]`` labels (the smallest id on a
    tie), or :data:`NO_OBJECT` for an image without objects."""
    if not len(labels):
        return NO_OBJECT
    return int(np.bincount(labels[:, 0].astype(np.int64)).argmax())


def split_yolo_dataset(
    train_dir: Path,
    test_dir: Path,
    out: Path,
    num_clients: int,
    partition: str,
    alpha: float,
    seed: int,
    min_client_samples: int,
) -> List[YoloClientCounts]:
    """Partition the training images over ``num_clients`` clients and write their folders.

    ``partition="iid"`` deals the training images out uniformly at random;
    ``"dirichlet"`` skews the clients' classes: each image is labelled with its
    :func:`dominant_class` and every class's images are spread over the clients in
    Dirichlet(``alpha``) proportions (see :func:`fedml_api.data.partition.partition_dirichlet`). Test images are
    always an IID share of ``test_dir``, so together the clients test on all of it. The
    train and test shares draw from independent random streams of ``seed``.
    """
    train_images = list_images(train_dir)
    test_images = list_images(test_dir)
    for folder, images in ((train_dir, train_images), (test_dir, test_images)):
        if len(images) < num_clients:
            raise ValueError(
                f"{folder} has {len(images)} images, too few for {num_clients} clients to get one each"
            )
    train_labels = [read_labels(label_path(p)) for p in train_images]
    test_labels = [read_labels(label_path(p)) for p in test_images]
    dominant = np.array([dominant_class(labels) for labels in train_labels], dtype=np.int64)
    train_shares, test_shares = partition_train_and_test(
        dominant, len(test_images), num_clients, partition, alpha, seed, min_client_samples
    )
    counts = []
    for client_id, (train_idx, test_idx) in enumerate(zip(train_shares, test_shares), start=1):
        client_dir = out / str(client_id)
        for subset, images, index in (("train", train_images, train_idx), ("test", test_images, test_idx)):
            copy_yolo_images([images[i] for i in index], client_dir / subset)
        objects = np.concatenate([train_labels[i][:, 0] for i in train_idx]).astype(np.int64)
        frequency = np.bincount(objects) if len(objects) else np.zeros(0, dtype=np.int64)
        top = tuple(int(c) for c in np.argsort(-frequency, kind="stable")[:3] if frequency[c] > 0)
        counts.append(
            YoloClientCounts(
                client_id=client_id,
                train_images=len(train_idx),
                train_objects=len(objects),
                train_classes=int(np.count_nonzero(frequency)),
                test_images=len(test_idx),
                test_objects=sum(len(test_labels[i]) for i in test_idx),
                top_classes=top,
            )
        )
    return counts


def copy_yolo_images(images: Sequence[Path], destination: Path) -> None:
    """Copy images and their label files to ``destination/images`` and ``destination/labels``.

    Raises ValueError when two images share a file name (they would overwrite each other).
    """
    names = [image.name for image in images]
    if len(set(names)) != len(names):
        raise ValueError(f"images with the same file name cannot go to one folder {destination}")
    (destination / "images").mkdir(parents=True, exist_ok=True)
    (destination / "labels").mkdir(parents=True, exist_ok=True)
    for image in images:
        shutil.copyfile(image, destination / "images" / image.name)
        labels = label_path(image)
        if labels.exists():
            shutil.copyfile(labels, destination / "labels" / f"{image.stem}.txt")


def format_yolo_split_table(counts: Sequence[YoloClientCounts]) -> str:
    """One row per client (images, objects, classes, top classes), then a total row."""
    header = f"{'client':>6} {'train img':>9} {'objects':>7} {'classes':>7} {'test img':>8} {'objects':>7}  top train classes"
    lines = [header]
    for c in counts:
        lines.append(
            f"{c.client_id:>6} {c.train_images:>9} {c.train_objects:>7} {c.train_classes:>7} "
            f"{c.test_images:>8} {c.test_objects:>7}  {', '.join(map(str, c.top_classes))}"
        )
    lines.append(
        f"{'total':>6} {sum(c.train_images for c in counts):>9} "
        f"{sum(c.train_objects for c in counts):>7} {'':>7} "
        f"{sum(c.test_images for c in counts):>8} {sum(c.test_objects for c in counts):>7}"
    )
    return "\n".join(lines)


def _dataset_root(folder: Path) -> Path:
    candidates = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    for candidate in candidates:
        if (candidate / "images").is_dir():
            return candidate
    raise FileNotFoundError(
        f"no YOLO dataset in {folder}: expected an images/ folder (with labels/ beside it) "
        "there or one level below"
    )


def _read_dataset_yaml(root: Path) -> dict:
    found = sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))
    if len(found) != 1:
        raise ValueError(
            f"expected one dataset YAML file in {root} naming the train and val image folders, "
            f"found {len(found)}; pass --yolo_train and --yolo_test instead"
        )
    with open(found[0], encoding="utf-8") as file:
        spec = yaml.safe_load(file)
    if not isinstance(spec, dict):
        raise ValueError(f"{found[0]} is not a YAML mapping")
    return spec
