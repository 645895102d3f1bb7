#!/usr/bin/env python
"""Split a public dataset into the per-client folders a federated run reads.

    python scripts/split_dataset.py --dataset cifar10 --source cifar-10-python.tar.gz \\
        --out data/cifar10_10c --clients 10 --partition dirichlet --alpha 0.5 --seed 0

writes ``<out>/<client_id>/train/data.h5`` and ``<out>/<client_id>/test/data.h5`` for client
ids 1..N, the MPI process ids of the clients (the server, process 0, holds no data). The
training set is partitioned with ``--partition``; every client's test data is an IID share
of the dataset's test set, so each client tests on data of its own and together the clients
test on the whole test set. Pass ``<out>`` as ``--data_path`` to the experiment.

To support another kind of dataset, write a function taking the parsed arguments and add
it to :data:`SPLITTERS` (its key becomes a ``--dataset`` choice).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

# Make the repository importable however the script is launched (any cwd, no install).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fedml_api.data.cifar10 import download_cifar10, load_cifar10  # noqa: E402
from fedml_api.data.client_data import write_client_split  # noqa: E402
from fedml_api.data.datasets import get_image_dataset_spec  # noqa: E402
from fedml_api.data.digits import load_digits_dataset  # noqa: E402
from fedml_api.data.partition import PARTITIONS, partition_train_and_test  # noqa: E402
from fedml_api.data.yolo_split import (  # noqa: E402
    find_subsets,
    format_yolo_split_table,
    open_yolo_source,
    split_yolo_dataset,
)

DOWNLOAD_DIR = "_download"


@dataclass(frozen=True)
class ClientCounts:
    """What was written for one client: sample counts and train samples per class."""

    client_id: int
    num_train: int
    num_test: int
    train_class_counts: np.ndarray  # int64 [num_classes]


def split_image_dataset(
    dataset_name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    out: Path,
    num_clients: int,
    partition: str,
    alpha: float,
    seed: int,
    min_client_samples: int,
) -> List[ClientCounts]:
    """Partition an image dataset (uint8 NHWC images, int64 labels) and write every client.

    The train and test shares draw from independent random streams derived from ``seed``,
    so choosing another ``--partition`` leaves the clients' test sets unchanged.
    """
    if num_clients > len(test_labels):
        raise ValueError(
            f"the {dataset_name} test set has {len(test_labels)} images, too few for "
            f"{num_clients} clients to get one each"
        )
    train_shares, test_shares = partition_train_and_test(
        train_labels, len(test_labels), num_clients, partition, alpha, seed, min_client_samples
    )
    num_classes = get_image_dataset_spec(dataset_name).num_classes
    counts = []
    for client_id, (train_idx, test_idx) in enumerate(zip(train_shares, test_shares), start=1):
        client_dir = out / str(client_id)
        write_client_split(
            client_dir / "train", train_images[train_idx], train_labels[train_idx], dataset_name
        )
        write_client_split(
            client_dir / "test", test_images[test_idx], test_labels[test_idx], dataset_name
        )
        histogram = np.bincount(train_labels[train_idx], minlength=num_classes)
        counts.append(ClientCounts(client_id, len(train_idx), len(test_idx), histogram))
    return counts


def format_split_table(counts: Sequence[ClientCounts]) -> str:
    """One row per client (train, test, train samples per class), then a total row."""
    totals = np.sum([c.train_class_counts for c in counts], axis=0)
    width = max(len(str(int(totals.max()))), 2) + 1
    num_classes = len(totals)

    def row(label: str, num_train: int, num_test: int, histogram: np.ndarray) -> str:
        cells = "".join(f"{int(n):>{width}}" for n in histogram)
        return f"{label:>6} {num_train:>7} {num_test:>7} {cells}"

    header = f"{'client':>6} {'train':>7} {'test':>7}  train samples of class 0..{num_classes - 1}"
    lines = [header]
    lines += [row(str(c.client_id), c.num_train, c.num_test, c.train_class_counts) for c in counts]
    lines.append(
        row("total", sum(c.num_train for c in counts), sum(c.num_test for c in counts), totals)
    )
    return "\n".join(lines)


def split_cifar10(args: argparse.Namespace) -> None:
    """CIFAR-10 from ``--source`` (or a download into ``<out>/_download`` when it is omitted)."""
    source = args.source
    if source is None:
        download_root = args.out / DOWNLOAD_DIR
        print(f"no --source given: downloading CIFAR-10 into {download_root}")
        source = download_cifar10(download_root)
    started = time.perf_counter()
    arrays = load_cifar10(source)
    print(
        f"loaded {len(arrays[1])} train and {len(arrays[3])} test images from {source} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    _split_and_report("cifar10", arrays, args)


def split_digits(args: argparse.Namespace) -> None:
    """scikit-learn's digits, split into train/test by ``--seed`` and ``--test_fraction``."""
    if args.source is not None:
        raise ValueError(
            "--source is not used for --dataset digits (the data ships with scikit-learn)"
        )
    _split_and_report("digits", load_digits_dataset(args.seed, args.test_fraction), args)


def split_yolo(args: argparse.Namespace) -> None:
    """A YOLO-format detection dataset (e.g. coco128) from ``--source``, a folder or a
    ``.tar.gz``; writes ``<out>/<id>/{train,test}/{images,labels}/`` per client."""
    if args.source is None:
        raise ValueError(
            "--dataset yolo needs --source: a YOLO dataset folder (images/, labels/ and its "
            ".yaml) or a .tar.gz of one, e.g. coco128.tar.gz"
        )
    with open_yolo_source(args.source) as root:
        train_dir, test_dir = find_subsets(root, args.yolo_train, args.yolo_test)
        print(f"splitting train images {train_dir} and test images {test_dir}")
        _remove_client_dirs(args.out)
        counts = split_yolo_dataset(train_dir, test_dir, **_partition_options(args))
    print(format_yolo_split_table(counts))
    print(f"wrote {len(counts)} clients to {args.out}")


def _partition_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The command line's partitioning options, as every splitter takes them."""
    return dict(out=args.out, num_clients=args.clients, partition=args.partition, alpha=args.alpha,
                seed=args.seed, min_client_samples=args.min_client_samples)


def _split_and_report(
    dataset_name: str, arrays: Sequence[np.ndarray], args: argparse.Namespace
) -> None:
    if args.train_samples is not None:
        arrays = _train_subset(arrays, args.train_samples, args.seed)
    _remove_client_dirs(args.out)
    counts = split_image_dataset(dataset_name, *arrays, **_partition_options(args))
    print(format_split_table(counts))
    print(f"wrote {len(counts)} clients to {args.out}")


def _train_subset(
    arrays: Sequence[np.ndarray], num_samples: int, seed: int
) -> Tuple[np.ndarray, ...]:
    """``(train_images, train_labels, test_images, test_labels)`` with the train set cut to a
    random ``num_samples`` of its images, in their original order; the stream is seeded apart
    from the partition's so the subset does not depend on ``--partition``."""
    train_images, train_labels, test_images, test_labels = arrays
    if num_samples > len(train_labels):
        raise ValueError(
            f"--train_samples {num_samples} is more than the {len(train_labels)} train images"
        )
    keep = np.sort(np.random.default_rng([seed, 1]).permutation(len(train_labels))[:num_samples])
    return train_images[keep], train_labels[keep], test_images, test_labels


#: ``--dataset`` name -> function that loads that dataset and writes the client folders.
SPLITTERS: Dict[str, Callable[[argparse.Namespace], None]] = {
    "cifar10": split_cifar10,
    "digits": split_digits,
    "yolo": split_yolo,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Split a dataset into <out>/<client_id>/{train,test}/ client folders."
    )
    parser.add_argument("--dataset", required=True, choices=sorted(SPLITTERS))
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="cifar10: cifar-10-python.tar.gz, its extracted folder, or a train/<class>/, "
        "test/<class>/ image folder (.tar.gz or directory); if omitted, download it. "
        "Not used for digits. yolo: a YOLO-format dataset folder or .tar.gz (required).",
    )
    parser.add_argument("--out", type=Path, required=True, help="the experiment's --data_path")
    parser.add_argument("--clients", type=int, default=10, help="number of clients N (ids 1..N)")
    parser.add_argument(
        "--partition", choices=PARTITIONS, default="iid", help="how to share the train set"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="dirichlet concentration: small (0.1) = few classes per client, "
        "large (100) = near IID",
    )
    parser.add_argument(
        "--min_client_samples",
        type=int,
        default=10,
        help="dirichlet: redraw until every client has at least this many train samples",
    )
    parser.add_argument(
        "--train_samples",
        type=int,
        default=None,
        help="cifar10, digits: partition only this many train images, a random subset drawn "
        "by --seed (default: all); for quick experiments. The test set is kept whole",
    )
    parser.add_argument(
        "--test_fraction", type=float, default=0.2, help="digits: share of images held out for test"
    )
    parser.add_argument(
        "--yolo_train",
        default=None,
        help="yolo: training image folder relative to the dataset root "
        "(default: 'train' of the dataset's .yaml)",
    )
    parser.add_argument(
        "--yolo_test",
        default=None,
        help="yolo: test image folder relative to the dataset root "
        "(default: 'val' of the dataset's .yaml)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of every random choice of the split"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace client folders already in --out"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the script with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Bad arguments exit through ``argparse`` (status 2); a missing or malformed source, or a
    failed download, prints one error line and returns 1.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error(f"--clients must be >= 1, got {args.clients}")
    if not args.alpha > 0:
        parser.error(f"--alpha must be > 0, got {args.alpha}")
    if args.train_samples is not None and args.train_samples < args.clients:
        parser.error(
            f"--train_samples must be at least --clients ({args.clients}), got {args.train_samples}"
        )
    if args.train_samples is not None and args.dataset == "yolo":
        parser.error("--train_samples is for the image classification datasets, not --dataset yolo")
    if args.min_client_samples < 0:
        parser.error(f"--min_client_samples must be >= 0, got {args.min_client_samples}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    existing = _client_dirs(args.out)
    if existing and not args.overwrite:
        parser.error(
            f"--out {args.out} already holds {len(existing)} client folders; "
            "pass --overwrite to replace them or choose another --out"
        )
    try:
        SPLITTERS[args.dataset](args)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    return 0


def _remove_client_dirs(out: Path) -> None:
    """Delete earlier client folders (main() has checked --overwrite) once the new data is
    loaded: a failed load keeps the old split, and no folder of a larger split survives."""
    for client_dir in _client_dirs(out):
        shutil.rmtree(client_dir)


def _client_dirs(out: Path) -> List[Path]:
    """The ``<out>/<integer>/`` folders an earlier run of this script may have written."""
    if not out.is_dir():
        return []
    return sorted(child for child in out.iterdir() if child.is_dir() and child.name.isdigit())


if __name__ == "__main__":
    sys.exit(main())
