"""YOLO-format data: labels, letterbox and augmentation geometry, batching, client splits."""

import importlib.util
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedml_api.data.yolo_dataset import (
    YoloDataset,
    collate_detections,
    count_yolo_images,
    label_path,
    read_labels,
)
from fedml_api.data.yolo_split import dominant_class
from fedml_api.data.yolo_transforms import DetectionAugmentation, letterbox

# Small tensors gain nothing from more threads; on a busy machine a second one can
# make them many times slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _import_split_script():
    spec = importlib.util.spec_from_file_location("split_dataset_for_yolo", REPO_ROOT / "scripts" / "split_dataset.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


split_dataset = _import_split_script()


def write_image(path: Path, width: int, height: int, boxes_px=(), colour=(255, 255, 255)) -> None:
    """A black image with filled rectangles (x1, y1, x2, y2) and their YOLO label file."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    lines = []
    for cls, (x1, y1, x2, y2) in boxes_px:
        pixels[y1:y2, x1:x2] = colour
        lines.append(f"{cls} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                     f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    if lines:
        labels = label_path(path)
        labels.parent.mkdir(parents=True, exist_ok=True)
        labels.write_text("\n".join(lines) + "\n")


def make_source(root: Path, num_train: int = 24, num_test: int = 10) -> Path:
    """A small coco128-like dataset: images/{train,val}, labels/{train,val}, data.yaml."""
    rng = np.random.default_rng(0)
    for subset, count in (("train", num_train), ("val", num_test)):
        for i in range(count):
            cls = i % 4  # classes 0..3 dominate in turn
            boxes = [(cls, (10, 10, 30, 40)), (int(rng.integers(4)), (40, 20, 60, 30))] if i % 6 else []
            write_image(root / "images" / subset / f"{subset}_{i:03d}.png", 80, 60, boxes)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: a\n  1: b\n")
    return root


def test_read_labels_parses_and_validates(tmp_path: Path):
    good = tmp_path / "good.txt"
    good.write_text("3 0.5 0.5 0.2 0.4\n\n0 0.1 0.2 0.05 0.1\n")
    np.testing.assert_allclose(read_labels(good), [[3, 0.5, 0.5, 0.2, 0.4], [0, 0.1, 0.2, 0.05, 0.1]], rtol=1e-6)
    assert read_labels(tmp_path / "missing.txt").shape == (0, 5)
    for text, message in (
        ("1 0.5 0.5 0.2\n", "expected 'class cx cy w h'"),
        ("1.5 0.5 0.5 0.2 0.2\n", "class must be a non-negative integer"),
        ("1 0.5 1.7 0.2 0.2\n", "coordinates must be fractions in \\[0, 1\\]"),
        ("1 0.5 0.5 0 0.2\n", "box width and height must be positive"),
        ("a b c d e\n", "expected five numbers"),
    ):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"bad.txt:1: {message}"):
            read_labels(bad)


def test_label_path_replaces_the_last_images_folder():
    assert label_path("/d/images/x/images/train/a.jpg") == Path("/d/images/x/labels/train/a.txt")
    with pytest.raises(ValueError, match="not inside an 'images' folder"):
        label_path("/d/pictures/a.jpg")


def test_letterbox_scales_centres_and_moves_the_boxes():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    boxes = np.array([[20, 10, 60, 50]], dtype=np.float32)
    canvas, moved, kept = letterbox(image, boxes, 64)
    assert canvas.shape == (64, 64, 3) and kept.tolist() == [True]
    # scale 64 / 200 = 0.32; height 32, centred: offset y = 16.
    np.testing.assert_allclose(moved, [[6.4, 3.2 + 16, 19.2, 16 + 16]], rtol=1e-6)
    assert (canvas[:16] == 114).all() and (canvas[16:48] == 0).all() and (canvas[48:] == 114).all()
    # A tiny object is still counted: evaluation must see every ground-truth box.
    _, tiny_box, kept = letterbox(image, np.array([[0, 0, 2, 2]], dtype=np.float32), 64)
    assert kept.tolist() == [True]


def test_augmented_boxes_still_enclose_their_objects(tmp_path: Path):
    write_image(tmp_path / "images" / "a.png", 160, 120, [(2, (30, 40, 90, 100))])
    augmentation = DetectionAugmentation(scale=0.3, translate=0.2, flip=0.5, hsv_h=0, hsv_s=0, hsv_v=0)
    dataset = YoloDataset(tmp_path, 64, augmentation)
    torch.manual_seed(0)
    flipped_seen = False
    for _ in range(20):
        image, targets = dataset[0]
        white = (image.min(dim=0).values > 200).nonzero()
        if len(targets) == 0:
            continue
        assert targets[0, 0] == 2
        cx, cy, w, h = targets[0, 1:].tolist()
        x1, y1, x2, y2 = white[:, 1].min().item(), white[:, 0].min().item(), white[:, 1].max().item() + 1, white[:, 0].max().item() + 1
        assert [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2] == pytest.approx([x1, y1, x2, y2], abs=1.5)
        flipped_seen |= cx > 32
    assert flipped_seen  # the object starts left of centre; some draws mirror it


def test_dataset_items_and_batches(tmp_path: Path):
    write_image(tmp_path / "images" / "a.png", 80, 40, [(1, (0, 0, 40, 20)), (0, (40, 20, 80, 40))])
    write_image(tmp_path / "images" / "b.png", 40, 80, [])  # background image: no label file
    dataset = YoloDataset(tmp_path, 64)
    assert len(dataset) == count_yolo_images(tmp_path) == 2
    assert dataset.num_objects == 2 and dataset.max_class == 1
    images, targets = collate_detections([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    # Image a is scaled by 0.8 and centred vertically (offset 16).
    np.testing.assert_allclose(targets, [[0, 1, 16, 24, 32, 16], [0, 0, 48, 40, 32, 16]], atol=1e-4)
    with pytest.raises(FileNotFoundError, match="split_dataset.py --dataset yolo"):
        YoloDataset(tmp_path / "missing", 64)


def test_dataset_nbytes_counts_the_labels_and_the_images_decoded_so_far(tmp_path: Path):
    write_image(tmp_path / "images" / "a.png", 80, 40, [(1, (0, 0, 40, 20)), (0, (40, 20, 80, 40))])
    write_image(tmp_path / "images" / "b.png", 40, 80, [])
    dataset = YoloDataset(tmp_path, 64)
    labels = 2 * 5 * 4  # two float32 rows of five for a, none for b
    assert dataset.nbytes == labels
    dataset[0]
    assert dataset.nbytes == labels + 64 * 32 * 3  # a, decoded at long side 64
    dataset[1]
    dataset[0]
    assert dataset.nbytes == labels + 2 * 64 * 32 * 3


def test_dominant_class():
    assert dominant_class(np.zeros((0, 5))) == -1
    assert dominant_class(np.array([[3, 0, 0, 1, 1], [1, 0, 0, 1, 1], [3, 0, 0, 1, 1]])) == 3
    assert dominant_class(np.array([[2, 0, 0, 1, 1], [1, 0, 0, 1, 1]])) == 1


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_split_script_writes_every_image_once(tmp_path: Path, partition, capsys):
    source = make_source(tmp_path / "src")
    out = tmp_path / "out"
    args = ["--dataset", "yolo", "--source", str(source), "--out", str(out), "--clients", "3",
            "--partition", partition, "--alpha", "0.2", "--min_client_samples", "2", "--seed", "1"]
    assert split_dataset.main(args) == 0
    assert "wrote 3 clients" in capsys.readouterr().out
    train = [sorted(p.name for p in (out / str(c) / "train" / "images").iterdir()) for c in (1, 2, 3)]
    test = [sorted(p.name for p in (out / str(c) / "test" / "images").iterdir()) for c in (1, 2, 3)]
    assert sorted(sum(train, [])) == sorted(p.name for p in (source / "images" / "train").iterdir())
    assert sorted(sum(test, [])) == sorted(p.name for p in (source / "images" / "val").iterdir())
    assert all(len(t) >= 2 for t in train) and all(len(t) in (3, 4) for t in test)
    for client in (1, 2, 3):
        for image in (out / str(client) / "train" / "images").iterdir():
            original = label_path(source / "images" / "train" / image.name)
            copied = out / str(client) / "train" / "labels" / f"{image.stem}.txt"
            assert copied.exists() == original.exists()
            if copied.exists():
                assert copied.read_bytes() == original.read_bytes()
    # Same seed, same split; an existing split is only replaced with --overwrite.
    with pytest.raises(SystemExit):
        split_dataset.main(args)
    assert split_dataset.main(args + ["--overwrite"]) == 0
    again = [sorted(p.name for p in (out / str(c) / "train" / "images").iterdir()) for c in (1, 2, 3)]
    assert again == train


def test_dirichlet_split_skews_the_clients_classes(tmp_path: Path):
    source = make_source(tmp_path / "src", num_train=60)
    out = tmp_path / "out"
    assert split_dataset.main(["--dataset", "yolo", "--source", str(source), "--out", str(out), "--clients", "2",
                               "--partition", "dirichlet", "--alpha", "0.05", "--min_client_samples", "5"]) == 0
    shares = []
    for client in (1, 2):
        labels = [read_labels(p) for p in (out / str(client) / "train" / "labels").iterdir()]
        counts = np.bincount([dominant_class(lab) for lab in labels if len(lab)], minlength=4)
        shares.append(counts / counts.sum())
    # With alpha 0.05 most dominant classes go (almost) entirely to one client.
    assert np.abs(shares[0] - shares[1]).sum() > 0.5


def test_split_script_reads_a_tar_gz_and_reports_bad_sources(tmp_path: Path, capsys):
    source = make_source(tmp_path / "mini")
    archive = tmp_path / "mini.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="mini")
    out = tmp_path / "out"
    assert split_dataset.main(["--dataset", "yolo", "--source", str(archive), "--out", str(out), "--clients", "2"]) == 0
    assert count_yolo_images(out / "1" / "train") + count_yolo_images(out / "2" / "train") == 24

    assert split_dataset.main(["--dataset", "yolo", "--out", str(tmp_path / "o2")]) == 1
    assert "--dataset yolo needs --source" in capsys.readouterr().err
    (source / "data.yaml").unlink()
    assert split_dataset.main(["--dataset", "yolo", "--source", str(source), "--out", str(tmp_path / "o3")]) == 1
    assert "pass --yolo_train and --yolo_test" in capsys.readouterr().err
    assert split_dataset.main(["--dataset", "yolo", "--source", str(source), "--out", str(tmp_path / "o3"),
                               "--yolo_train", "images/train", "--yolo_test", "images/val", "--clients", "2"]) == 0
