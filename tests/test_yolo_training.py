"""YOLOv3 training on real coco128 images: the loss, the trainer and its test results.

Needs ../shared/data/coco128.tar.gz (skipped with a reason where it is absent).
"""

import json
import shutil
import tarfile
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA
from fedml_api.data.client_data import cache_info, clear_cache, set_cache_budget
from fedml_api.data.yolo_dataset import YoloDataset, collate_detections, label_path, list_images
from fedml_api.model.YOLOv3 import CFG_DIR, Darknet, YOLOv3ResultAggregator, YOLOv3Trainer, yolo_loss

# Small tensors gain nothing from more threads; on a busy machine a second one can
# make them many times slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

COCO128 = SHARED_DATA / "coco128.tar.gz"


@pytest.fixture(scope="module")
def coco128(tmp_path_factory) -> Path:
    if not COCO128.exists():
        pytest.skip(f"real data not available: {COCO128} is missing (see ../shared/data/README.md)")
    root = tmp_path_factory.mktemp("coco")
    with tarfile.open(COCO128) as archive:
        archive.extractall(root, filter="data")
    return root / "coco128"


def copy_images(coco128: Path, subset: str, count: int, destination: Path) -> Path:
    """The first ``count`` labelled images of a coco128 subset as a YOLO folder."""
    images = [p for p in list_images(coco128 / "images" / subset) if label_path(p).exists()][:count]
    for image in images:
        (destination / "images").mkdir(parents=True, exist_ok=True)
        (destination / "labels").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, destination / "images" / image.name)
        shutil.copyfile(label_path(image), destination / "labels" / f"{image.stem}.txt")
    return destination


def training_args(**overrides) -> Namespace:
    args = dict(
        img_size=64, epochs=1, batch_size=4, optimizer="adamw", lr=1e-3, momentum=0.9, wd=5e-4,
        lr_schedule="constant", comm_round=1, round_idx=0, no_augment=False, aug_scale=0.25,
        aug_translate=0.1, aug_flip=0.5, aug_hsv_h=0.015, aug_hsv_s=0.7, aug_hsv_v=0.4,
        test_batch_size=8, conf_thres=0.001, nms_iou=0.6, max_det=100, match_stats=True,
    )
    args.update(overrides)
    return Namespace(**args)


def test_the_loss_falls_by_half_when_overfitting_four_images(coco128, tmp_path):
    torch.manual_seed(0)
    folder = copy_images(coco128, "train2017", 4, tmp_path / "four")
    images, targets = collate_detections(list(YoloDataset(folder, 96)))
    assert len(targets) > 0
    images = images.float() / 255
    model = Darknet(CFG_DIR / "yolov3-tiny.cfg").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss, parts = yolo_loss(model(images), targets, model.yolo_layers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert all(torch.isfinite(p) for p in parts.values())
    assert sum(losses[-3:]) / 3 <= 0.5 * losses[0], losses


def test_the_loss_of_images_without_objects_is_objectness_only():
    model = Darknet(CFG_DIR / "yolov3-tiny.cfg")
    loss, parts = yolo_loss(model(torch.rand(2, 3, 64, 64)), torch.zeros(0, 6), model.yolo_layers)
    assert loss.item() > 0 and parts["box"].item() == 0 and parts["class"].item() == 0
    loss.backward()


def test_the_trainer_trains_and_reports_json_metrics_with_match_statistics(coco128, tmp_path):
    torch.manual_seed(0)
    train = copy_images(coco128, "train2017", 8, tmp_path / "train")
    test = copy_images(coco128, "val2017", 6, tmp_path / "test")
    model = Darknet(CFG_DIR / "yolov3-tiny.cfg")
    trainer = YOLOv3Trainer(model)
    assert trainer.get_local_sample_number(str(train)) == 8
    before = {k: v.clone() for k, v in trainer.get_model_params().items()}
    args = training_args()
    trainer.train(torch.device("cpu"), args, str(train))
    after = trainer.get_model_params()
    assert not torch.equal(before["module_list.0.conv.weight"], after["module_list.0.conv.weight"])
    assert not torch.equal(before["module_list.0.bn.running_mean"], after["module_list.0.bn.running_mean"])

    result = trainer.test(torch.device("cpu"), args, str(test))
    json.dumps(result)
    assert result["num_images"] == 6 and result["num_ground_truth"] > 0
    for key in ("precision", "recall", "mAP50", "mAP50_95"):
        assert 0.0 <= result[key] <= 1.0, key
    # One client's union is itself: the server reproduces the client's own numbers.
    combined = YOLOv3ResultAggregator().aggregate_result({0: {"result": result, "sample_number": 6}})
    assert combined["exact_union"] is True
    for key in ("precision", "recall", "mAP50", "mAP50_95"):
        assert combined[key] == pytest.approx(result[key], abs=1e-12), key

    scalars_only = trainer.test(torch.device("cpu"), training_args(match_stats=False), str(test))
    assert "match_stats" not in scalars_only and scalars_only["mAP50"] == result["mAP50"]


def test_the_trainer_rejects_labels_the_model_cannot_predict(tmp_path):
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    Image.new("RGB", (32, 32)).save(folder / "images" / "a.png")
    (folder / "labels" / "a.txt").write_text("80 0.5 0.5 0.5 0.5\n")
    trainer = YOLOv3Trainer(Darknet(CFG_DIR / "yolov3-tiny.cfg"))
    with pytest.raises(ValueError, match="class 80, but the model .* detects 80 classes"):
        trainer.test(torch.device("cpu"), training_args(), str(folder))


def _one_image_folder(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    Image.new("RGB", (32, 32)).save(folder / "images" / "a.png")
    (folder / "labels" / "a.txt").write_text("3 0.5 0.5 0.5 0.5\n")
    return folder


@pytest.mark.parametrize("budget", [None, 0])
def test_the_trainer_keeps_its_datasets_in_the_budgeted_process_cache(tmp_path, budget):
    folder = _one_image_folder(tmp_path / "data")
    trainer = YOLOv3Trainer(Darknet(CFG_DIR / "yolov3-tiny.cfg"))
    clear_cache()
    set_cache_budget(budget)
    try:
        for _ in range(2):
            trainer.test(torch.device("cpu"), training_args(), str(folder))
        info = cache_info()
        if budget is None:
            # Counted once its image is decoded: 64 x 64 x 3 bytes, and one label row.
            assert (info.entries, info.bytes, info.hits, info.misses) == (1, 64 * 64 * 3 + 20, 1, 1)
        else:
            assert (info.entries, info.bytes, info.hits, info.misses) == (0, 0, 0, 2)
            assert info.rejected == 2
    finally:
        clear_cache()
        set_cache_budget(None)
