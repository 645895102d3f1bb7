"""Specification of the data layer: specs, loaders, partitions, client files, split script."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Tuple

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from fedml_api.data.cifar10 import CIFAR10_CLASSES, load_cifar10
from fedml_api.data.client_data import (
    cache_info,
    clear_cache,
    count_client_samples,
    load_client_split,
    set_cache_budget,
    write_client_split,
)
from fedml_api.data.datasets import IMAGE_DATASETS, get_image_dataset_spec
from fedml_api.data.digits import load_digits_dataset
from fedml_api.data.memory_cache import MemoryBudgetLRU
from fedml_api.data.partition import partition_dirichlet, partition_iid

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLIT_SCRIPT = REPO_ROOT / "scripts" / "split_dataset.py"
REAL_CIFAR10 = REPO_ROOT.parent / "shared" / "data" / "cifar10-images.tar.gz"


def _import_split_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("split_dataset", SPLIT_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


split_dataset = _import_split_script()


def _labels(num_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(num_classes), per_class)


def _assert_exact_cover(shares: List[np.ndarray], num_samples: int) -> None:
    combined = np.concatenate(shares)
    assert combined.dtype == np.int64
    assert np.array_equal(np.sort(combined), np.arange(num_samples))


# --- dataset specs ---------------------------------------------------------------------------


def test_registry_knows_cifar10_and_digits():
    cifar = get_image_dataset_spec("cifar10")
    assert (cifar.channels, cifar.image_size, cifar.num_classes) == (3, 32, 10)
    assert (cifar.crop_padding, cifar.horizontal_flip) == (4, True)
    digits = get_image_dataset_spec("digits")
    assert (digits.channels, digits.image_size, digits.num_classes) == (1, 8, 10)
    assert (digits.crop_padding, digits.horizontal_flip) == (1, False)


def test_unknown_dataset_error_lists_known_names():
    with pytest.raises(
        ValueError, match=r"unknown image dataset 'mnist'; known datasets: cifar10, digits"
    ):
        get_image_dataset_spec("mnist")


def test_digits_spec_statistics_match_the_stored_pixels():
    train, _, test, _ = load_digits_dataset(seed=0)
    pixels = np.concatenate([train, test]).astype(np.float64) / 255.0
    spec = IMAGE_DATASETS["digits"]
    assert pixels.mean() == pytest.approx(spec.mean[0], abs=1e-3)
    assert pixels.std() == pytest.approx(spec.std[0], abs=1e-3)


# --- partitions ------------------------------------------------------------------------------


def test_iid_partition_covers_every_index_once_in_near_equal_shares():
    shares = partition_iid(_labels(10, 101), 7, np.random.default_rng(0))
    assert len(shares) == 7
    _assert_exact_cover(shares, 1010)
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1


def test_iid_partition_is_deterministic_by_seed():
    labels = _labels(10, 50)
    first = partition_iid(labels, 4, np.random.default_rng(3))
    again = partition_iid(labels, 4, np.random.default_rng(3))
    other = partition_iid(labels, 4, np.random.default_rng(4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("num_clients", [0, 11])
def test_iid_partition_rejects_client_counts_outside_1_to_n(num_clients):
    with pytest.raises(ValueError, match="num_clients must be between 1 and the number of samples"):
        partition_iid(_labels(1, 10), num_clients, np.random.default_rng(0))


def test_dirichlet_partition_covers_every_index_once_and_is_deterministic():
    labels = _labels(10, 100)
    first = partition_dirichlet(labels, 8, 0.5, np.random.default_rng(1))
    again = partition_dirichlet(labels, 8, 0.5, np.random.default_rng(1))
    _assert_exact_cover(first, len(labels))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_dirichlet_partition_skews_classes_when_alpha_is_small():
    labels = _labels(10, 200)

    def mean_top_class_share(alpha: float) -> float:
        shares = partition_dirichlet(labels, 10, alpha, np.random.default_rng(0))
        return float(np.mean([np.bincount(labels[s], minlength=10).max() / len(s) for s in shares]))

    assert mean_top_class_share(0.1) > 0.5  # a few classes dominate each client
    assert mean_top_class_share(1000.0) < 0.2  # close to the IID share of 0.1


def test_dirichlet_partition_respects_the_minimum_share():
    labels = _labels(10, 30)
    shares = partition_dirichlet(
        labels, 10, 0.1, np.random.default_rng(0), min_samples_per_client=15
    )
    assert min(len(share) for share in shares) >= 15


def test_dirichlet_partition_rejects_an_impossible_minimum():
    with pytest.raises(ValueError, match="cannot give each of 10 clients at least 11 samples"):
        partition_dirichlet(
            _labels(10, 10), 10, 1.0, np.random.default_rng(0), min_samples_per_client=11
        )


def test_dirichlet_partition_gives_up_after_max_attempts():
    with pytest.raises(RuntimeError, match="raise alpha"):
        partition_dirichlet(
            _labels(2, 50),
            50,
            0.01,
            np.random.default_rng(0),
            min_samples_per_client=2,
            max_attempts=3,
        )


def test_dirichlet_partition_rejects_non_positive_alpha():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition_dirichlet(_labels(2, 5), 2, 0.0, np.random.default_rng(0))


# --- client files ----------------------------------------------------------------------------


def test_client_split_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 6, 3), dtype=np.uint8)  # NHWC, H != W on purpose
    labels = np.array([3, 1, 4, 1, 5], dtype=np.int32)
    write_client_split(tmp_path / "train", images, labels, "cifar10")

    split = load_client_split(tmp_path / "train")
    assert split.images.dtype.is_floating_point is False and split.images.dtype.itemsize == 1
    assert tuple(split.images.shape) == (5, 3, 4, 6) and split.images.is_contiguous()
    assert np.array_equal(split.images.permute(0, 2, 3, 1).numpy(), images)
    assert split.labels.tolist() == [3, 1, 4, 1, 5] and str(split.labels.dtype) == "torch.int64"
    assert split.dataset == "cifar10" and len(split) == 5
    assert count_client_samples(tmp_path / "train") == 5
    with h5py.File(tmp_path / "train" / "data.h5", "r") as file:
        assert file["images"].dtype == np.uint8 and file["labels"].dtype == np.int64
        assert file.attrs["num_samples"] == 5


def test_client_split_is_loaded_once_per_process_until_rewritten(tmp_path):
    images = np.zeros((2, 8, 8, 1), dtype=np.uint8)
    write_client_split(tmp_path, images, np.array([0, 1]), "digits")
    first = load_client_split(tmp_path)
    assert load_client_split(str(tmp_path)) is first  # same absolute path, same object

    write_client_split(
        tmp_path, np.ones((3, 8, 8, 1), dtype=np.uint8), np.array([0, 1, 2]), "digits"
    )
    reloaded = load_client_split(tmp_path)
    assert reloaded is not first and len(reloaded) == 3


def test_missing_client_data_names_the_path_and_the_script(tmp_path):
    missing = tmp_path / "7" / "train"
    for read in (load_client_split, count_client_samples):
        with pytest.raises(FileNotFoundError, match=r"7.train.*scripts/split_dataset\.py"):
            read(missing)


def test_write_client_split_rejects_non_uint8_images(tmp_path):
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, H, W, C\]"):
        write_client_split(
            tmp_path, np.zeros((2, 8, 8, 1), dtype=np.float32), np.array([0, 1]), "digits"
        )


# --- the client-data cache: LRU within a memory budget ---------------------------------------


@pytest.fixture
def fresh_cache():
    """An empty, unbounded cache with zeroed counters, and the default restored after."""
    clear_cache()
    set_cache_budget(None)
    yield
    clear_cache()
    set_cache_budget(None)


def _client(root: Path, name: str, num_samples: int, fill: int = 0) -> Path:
    """A digits-shaped split of ``num_samples`` images: ``num_samples * (64 + 8)`` bytes
    in memory (8x8x1 uint8 images, int64 labels)."""
    images = np.full((num_samples, 8, 8, 1), fill, dtype=np.uint8)
    write_client_split(root / name, images, np.arange(num_samples) % 10, "digits")
    return root / name


def _nbytes(num_samples: int) -> int:
    return num_samples * (8 * 8 * 1 + 8)


def test_cache_is_unbounded_by_default_so_one_client_per_process_reads_once(tmp_path, fresh_cache):
    clients = [_client(tmp_path, str(i), 10) for i in range(20)]
    for _ in range(3):
        for client in clients:
            load_client_split(client)
    info = cache_info()
    assert info.max_bytes is None
    assert (info.entries, info.bytes) == (20, 20 * _nbytes(10))
    assert (info.misses, info.hits, info.evictions, info.rejected) == (20, 40, 0, 0)


def test_cache_counts_hits_and_misses_and_entry_size_is_images_plus_labels(tmp_path, fresh_cache):
    client = _client(tmp_path, "1", 3)
    first = load_client_split(client)
    assert first.nbytes == first.images.nbytes + first.labels.nbytes == _nbytes(3)
    assert load_client_split(client) is first and load_client_split(str(client)) is first
    assert cache_info()[:2] == (1, _nbytes(3))
    assert (cache_info().misses, cache_info().hits) == (1, 2)


def test_cache_evicts_the_least_recently_used_split_and_a_reread_one_becomes_recent(
    tmp_path, fresh_cache
):
    a, b, c, d = (_client(tmp_path, name, 10) for name in "abcd")
    set_cache_budget(3 * _nbytes(10))  # room for exactly three
    loaded = {client: load_client_split(client) for client in (a, b, c)}
    assert load_client_split(a) is loaded[a]  # a becomes the most recent: b is the oldest
    loaded[d] = load_client_split(d)
    info = cache_info()
    assert (info.entries, info.bytes, info.evictions) == (3, 3 * _nbytes(10), 1)
    # Three hits among the three entries: b is the one evicted.
    assert all(load_client_split(client) is loaded[client] for client in (c, a, d))
    # Order of use now, oldest first: c, a, d; b comes back in place of c.
    assert load_client_split(b) is not loaded[b]
    assert cache_info().evictions == 2
    assert all(load_client_split(client) is loaded[client] for client in (a, d))
    assert load_client_split(c) is not loaded[c]


def test_cache_budget_is_respected_to_the_byte(tmp_path, fresh_cache):
    small, large = _client(tmp_path, "small", 2), _client(tmp_path, "large", 5)
    set_cache_budget(_nbytes(2) + _nbytes(5))  # both fit exactly
    load_client_split(small)
    load_client_split(large)
    assert cache_info()[:3] == (2, _nbytes(7), _nbytes(7))
    assert cache_info().evictions == 0

    clear_cache()
    set_cache_budget(_nbytes(7) - 1)  # one byte short: the older goes
    load_client_split(small)
    kept = load_client_split(large)
    info = cache_info()
    assert (info.entries, info.bytes, info.evictions) == (1, _nbytes(5), 1)
    assert load_client_split(large) is kept


def test_lowering_the_budget_evicts_least_recently_used_splits_at_once(tmp_path, fresh_cache):
    a, b, c = (_client(tmp_path, name, 4) for name in "abc")
    split_a = load_client_split(a)
    for client in (b, c, a):
        load_client_split(client)  # order of use, oldest first: b, c, a
    set_cache_budget(_nbytes(4))
    info = cache_info()
    assert (info.entries, info.bytes, info.evictions) == (1, _nbytes(4), 2)
    assert load_client_split(a) is split_a


def test_a_split_larger_than_the_budget_is_returned_but_not_kept_nor_evicting(
    tmp_path, fresh_cache
):
    small, huge = _client(tmp_path, "small", 2), _client(tmp_path, "huge", 50, fill=7)
    set_cache_budget(_nbytes(10))
    kept = load_client_split(small)
    split = load_client_split(huge)
    assert len(split) == 50 and int(split.images.max()) == 7
    info = cache_info()
    assert (info.entries, info.bytes, info.evictions, info.rejected) == (1, _nbytes(2), 0, 1)
    assert load_client_split(huge) is not split  # read again
    assert load_client_split(small) is kept


def test_budget_zero_caches_nothing_but_every_load_still_returns_the_data(tmp_path, fresh_cache):
    client = _client(tmp_path, "1", 3, fill=5)
    set_cache_budget(0)
    first, second = load_client_split(client), load_client_split(client)
    assert first is not second and int(first.images[0, 0, 0, 0]) == 5
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    info = cache_info()
    assert (info.entries, info.bytes, info.hits, info.misses, info.rejected) == (0, 0, 0, 2, 2)


def test_none_restores_an_unbounded_cache(tmp_path, fresh_cache):
    set_cache_budget(_nbytes(1))
    set_cache_budget(None)
    for i in range(5):
        load_client_split(_client(tmp_path, str(i), 100))
    assert cache_info()[:3] == (5, 5 * _nbytes(100), None)


def test_a_rewritten_file_is_read_again_and_replaces_its_stale_entry(tmp_path, fresh_cache):
    client = _client(tmp_path, "1", 4, fill=1)
    first = load_client_split(client)
    # Same shape and size, other pixels: only the modification time tells them apart.
    _client(tmp_path, "1", 4, fill=2)
    stat = (client / "data.h5").stat()
    os.utime(client / "data.h5", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = load_client_split(client)
    assert second is not first and int(second.images.max()) == 2
    # A different size: the entry's bytes follow the new file.
    _client(tmp_path, "1", 9)
    assert len(load_client_split(client)) == 9
    info = cache_info()
    assert (info.entries, info.bytes, info.misses, info.hits, info.evictions) == (
        1, _nbytes(9), 3, 0, 0,
    )


@pytest.mark.parametrize("budget, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_cache_budget_must_be_none_or_a_non_negative_number_of_bytes(fresh_cache, budget, error):
    with pytest.raises(error, match="cache budget"):
        set_cache_budget(budget)
    assert cache_info().max_bytes is None


def test_cache_stays_consistent_within_its_budget_under_concurrent_use(tmp_path, fresh_cache):
    # The store itself, hammered by threads (a worker may prefetch the next client in one).
    cache = MemoryBudgetLRU(max_bytes=1000)
    sizes = {key: 50 + 37 * key for key in range(20)}
    errors: List[BaseException] = []

    def use(offset: int) -> None:
        try:
            for step in range(2000):
                key = (offset * 7 + step) % len(sizes)
                if cache.get(key) is None:
                    cache.put(key, f"value {key}", sizes[key])
                elif step % 11 == 0:
                    cache.discard(key)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=use, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    info = cache.info()
    assert info.hits + info.misses == 4 * 2000
    held = [key for key in sizes if key in cache]
    assert len(held) == info.entries and sum(sizes[key] for key in held) == info.bytes <= 1000
    # And load_client_split goes through the process's store from several threads too.
    client = _client(tmp_path, "1", 3)
    results: List[object] = []
    loaders = [
        threading.Thread(target=lambda: results.append(load_client_split(client))) for _ in range(4)
    ]
    for thread in loaders:
        thread.start()
    for thread in loaders:
        thread.join()
    assert len(results) == 4 and all(len(split) == 3 for split in results)
    assert cache_info()[:2] == (1, _nbytes(3))


# --- digits ----------------------------------------------------------------------------------


def test_digits_loader_shapes_ranges_and_stratified_split():
    train_images, train_labels, test_images, test_labels = load_digits_dataset(
        seed=0, test_fraction=0.2
    )
    assert train_images.shape == (1437, 8, 8, 1) and test_images.shape == (360, 8, 8, 1)
    assert train_images.dtype == np.uint8 and train_labels.dtype == np.int64
    assert train_images.min() == 0 and train_images.max() == 255
    assert set(np.unique(test_labels)) == set(range(10))
    # Stratified: each class keeps its share of the test set to within one image.
    all_counts = np.bincount(np.concatenate([train_labels, test_labels]))
    assert np.all(np.abs(np.bincount(test_labels) - 0.2 * all_counts) <= 1)


def test_digits_split_is_deterministic_by_seed():
    first, again, other = (load_digits_dataset(seed)[3] for seed in (1, 1, 2))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


# --- CIFAR-10 readers (tiny synthetic archives) ----------------------------------------------


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_tar(path: Path, files: Dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _image_folder_files(prefix: str) -> Tuple[Dict[str, bytes], Dict[str, np.ndarray]]:
    """Two PNG train images (classes 'truck' and 'airplane'), one JPEG test image ('cat')."""
    rng = np.random.default_rng(0)
    pixels = {name: rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for name in ("b", "a")}
    flat_grey = np.full((32, 32, 3), 128, dtype=np.uint8)  # survives JPEG almost unchanged
    files = {
        f"{prefix}train/truck/0001.png": _encode(pixels["b"], "PNG"),
        f"{prefix}train/airplane/0002.png": _encode(pixels["a"], "PNG"),
        f"{prefix}test/cat/0003.jpg": _encode(flat_grey, "JPEG"),
        f"{prefix}train/truck/._0001.png": b"macOS metadata, not an image",
    }
    return files, {"airplane": pixels["a"], "truck": pixels["b"], "cat": flat_grey}


def _check_image_folder_arrays(arrays, expected: Dict[str, np.ndarray]) -> None:
    train_images, train_labels, test_images, test_labels = arrays
    assert train_images.shape == (2, 32, 32, 3) and train_images.dtype == np.uint8
    # Ordered by class index: airplane (0) before truck (9), whatever the archive order.
    assert train_labels.tolist() == [0, 9] and train_labels.dtype == np.int64
    assert np.array_equal(train_images[0], expected["airplane"])
    assert np.array_equal(train_images[1], expected["truck"])
    assert test_labels.tolist() == [CIFAR10_CLASSES.index("cat")]
    assert np.abs(test_images[0].astype(int) - 128).max() <= 2


@pytest.mark.parametrize("prefix", ["", "cifar10-images/"])
def test_image_folder_tar_is_read_with_or_without_a_top_level_folder(tmp_path, prefix):
    files, expected = _image_folder_files(prefix)
    archive = _write_tar(tmp_path / "images.tar.gz", files)
    _check_image_folder_arrays(load_cifar10(archive), expected)


def test_image_folder_directory_is_read_directly_or_from_its_parent(tmp_path):
    files, expected = _image_folder_files("extracted/")
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    _check_image_folder_arrays(load_cifar10(tmp_path / "extracted"), expected)
    _check_image_folder_arrays(load_cifar10(tmp_path), expected)


def test_image_folder_rejects_unknown_class_folders(tmp_path):
    image = _encode(np.zeros((32, 32, 3), dtype=np.uint8), "PNG")
    archive = _write_tar(
        tmp_path / "x.tar.gz", {"train/cats/1.png": image, "test/cat/1.png": image}
    )
    with pytest.raises(
        ValueError, match=r"unknown class folder 'train/cats/1\.png'; expected one of airplane"
    ):
        load_cifar10(archive)


def _official_batches(per_batch: int) -> Dict[str, Tuple[np.ndarray, List[int]]]:
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {
        name: (
            rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            rng.integers(0, 10, size=per_batch).tolist(),
        )
        for name in names
    }


def _pickled(data: np.ndarray, labels: List[int]) -> bytes:
    # The real files are Python 2 pickles whose str keys load as str under latin1.
    return pickle.dumps({"batch_label": "fake", "data": data, "labels": labels})


def _check_official_arrays(arrays, batches) -> None:
    train_images, train_labels, test_images, test_labels = arrays
    assert train_images.shape == (10, 32, 32, 3) and test_images.shape == (2, 32, 32, 3)
    assert train_labels.dtype == np.int64 and train_images.flags.c_contiguous
    rows, labels = batches["data_batch_2"]
    # Row layout is 1024 red, 1024 green, 1024 blue values, each 32x32 row-major.
    image, row = train_images[2 + 1], rows[1]
    assert image[5, 7, 0] == row[5 * 32 + 7]
    assert image[5, 7, 2] == row[2 * 1024 + 5 * 32 + 7]
    assert train_labels[2:4].tolist() == labels
    assert test_labels.tolist() == batches["test_batch"][1]


def test_official_archive_is_read_from_the_tar(tmp_path):
    batches = _official_batches(per_batch=2)
    files = {f"cifar-10-batches-py/{name}": _pickled(*batch) for name, batch in batches.items()}
    files["cifar-10-batches-py/readme.html"] = b"<html></html>"
    archive = _write_tar(tmp_path / "cifar-10-python.tar.gz", files)
    _check_official_arrays(load_cifar10(archive), batches)


def test_official_batches_are_read_from_the_extracted_folder_or_its_parent(tmp_path):
    batches = _official_batches(per_batch=2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in batches.items():
        (folder / name).write_bytes(_pickled(*batch))
    _check_official_arrays(load_cifar10(folder), batches)
    _check_official_arrays(load_cifar10(tmp_path), batches)


def test_incomplete_official_archive_names_the_missing_batch(tmp_path):
    batches = _official_batches(per_batch=1)
    del batches["data_batch_3"]
    files = {f"cifar-10-batches-py/{name}": _pickled(*batch) for name, batch in batches.items()}
    with pytest.raises(ValueError, match="missing data_batch_3"):
        load_cifar10(_write_tar(tmp_path / "c.tar.gz", files))


def test_cifar10_sources_in_no_known_layout_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere.tar.gz")
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(ValueError, match=r"not a tar archive; expected cifar-10-python\.tar\.gz"):
        load_cifar10(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="no CIFAR-10 files found"):
        load_cifar10(_write_tar(tmp_path / "other.tar.gz", {"a/b.txt": b"x"}))


@pytest.mark.skipif(
    not REAL_CIFAR10.exists(), reason=f"real CIFAR-10 archive not found at {REAL_CIFAR10}"
)
def test_real_cifar10_image_archive_loads_completely():
    started = time.perf_counter()
    train_images, train_labels, test_images, test_labels = load_cifar10(REAL_CIFAR10)
    print(f"loaded the real CIFAR-10 archive in {time.perf_counter() - started:.1f} s")
    assert train_images.shape == (50000, 32, 32, 3) and test_images.shape == (10000, 32, 32, 3)
    assert train_images.dtype == np.uint8 and train_labels.dtype == np.int64
    assert np.bincount(train_labels).tolist() == [5000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    # The re-encoded JPEGs keep the usual statistics that normalisation relies on.
    channel_means = train_images.reshape(-1, 3).mean(axis=0) / 255.0
    assert np.allclose(channel_means, IMAGE_DATASETS["cifar10"].mean, atol=0.01)


# --- scripts/split_dataset.py ----------------------------------------------------------------


def test_split_script_writes_every_client_of_digits_from_any_directory(tmp_path):
    out = tmp_path / "clients"
    command = [
        sys.executable,
        str(SPLIT_SCRIPT),
        "--dataset",
        "digits",
        "--out",
        str(out),
        "--clients",
        "4",
        "--partition",
        "dirichlet",
        "--alpha",
        "0.3",
        "--seed",
        "1",
    ]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "train samples of class 0..9" in result.stdout
    assert "total    1437     360" in result.stdout

    train_counts, test_counts = [], []
    for client_id in range(1, 5):
        train_counts.append(count_client_samples(out / str(client_id) / "train"))
        test_counts.append(count_client_samples(out / str(client_id) / "test"))
        assert f"\n{client_id:>6} {train_counts[-1]:>7} {test_counts[-1]:>7} " in result.stdout
    assert not (out / "5").exists()
    assert sum(train_counts) == 1437 and sum(test_counts) == 360
    assert max(test_counts) - min(test_counts) <= 1  # the test set is shared out IID


def test_split_script_reads_cifar10_from_source(tmp_path, capsys):
    batches = _official_batches(per_batch=4)
    files = {f"cifar-10-batches-py/{name}": _pickled(*batch) for name, batch in batches.items()}
    archive = _write_tar(tmp_path / "cifar-10-python.tar.gz", files)
    out = tmp_path / "clients"
    assert (
        split_dataset.main(
            ["--dataset", "cifar10", "--source", str(archive), "--out", str(out), "--clients", "2"]
        )
        == 0
    )
    split = load_client_split(out / "2" / "train")
    assert split.dataset == "cifar10" and tuple(split.images.shape) == (10, 3, 32, 32)
    assert "total      20       4" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--clients", "0"], "--clients must be >= 1"),
        (["--alpha", "0"], "--alpha must be > 0"),
        (["--partition", "shards"], "invalid choice: 'shards'"),
    ],
)
def test_split_script_rejects_bad_arguments(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        split_dataset.main(["--dataset", "digits", "--out", str(tmp_path / "o"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_split_script_refuses_a_file_as_out_and_existing_clients_without_overwrite(
    tmp_path, capsys
):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        split_dataset.main(["--dataset", "digits", "--out", str(tmp_path / "file")])
    assert "exists and is not a directory" in capsys.readouterr().err

    (tmp_path / "out" / "3").mkdir(parents=True)
    with pytest.raises(SystemExit):
        split_dataset.main(["--dataset", "digits", "--out", str(tmp_path / "out")])
    assert "pass --overwrite" in capsys.readouterr().err
    assert (
        split_dataset.main(
            ["--dataset", "digits", "--out", str(tmp_path / "out"), "--clients", "2", "--overwrite"]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["1", "2"]


def test_split_script_reports_a_missing_source_without_a_traceback(tmp_path, capsys):
    code = split_dataset.main(
        [
            "--dataset",
            "cifar10",
            "--source",
            str(tmp_path / "missing.tar.gz"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 1
    assert "missing.tar.gz does not exist" in capsys.readouterr().err


def test_train_samples_partitions_a_seeded_subset_and_keeps_the_test_set_whole(tmp_path, capsys):
    def split(out, seed):
        assert split_dataset.main(["--dataset", "digits", "--out", str(out), "--clients", "3",
                                   "--train_samples", "300", "--seed", str(seed)]) == 0
        return np.concatenate([load_client_split(out / str(c) / "train").labels.numpy()
                               for c in (1, 2, 3)])

    labels = split(tmp_path / "a", 0)
    assert "total     300     360" in capsys.readouterr().out
    assert len(labels) == 300 and len(np.unique(labels)) == 10  # a random draw, not one class
    np.testing.assert_array_equal(np.sort(split(tmp_path / "b", 0)), np.sort(labels))
    assert not np.array_equal(np.sort(split(tmp_path / "c", 1)), np.sort(labels))


def test_train_samples_fewer_than_clients_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        split_dataset.main(["--dataset", "digits", "--out", str(tmp_path / "o"), "--clients", "3",
                            "--train_samples", "2"])
    assert exit_info.value.code == 2
    assert "--train_samples must be at least --clients (3), got 2" in capsys.readouterr().err


def test_train_samples_beyond_the_train_set_names_its_size(tmp_path, capsys):
    code = split_dataset.main(["--dataset", "digits", "--out", str(tmp_path / "o"),
                               "--train_samples", "5000"])
    assert code == 1
    assert "--train_samples 5000 is more than the 1437 train images" in capsys.readouterr().err
