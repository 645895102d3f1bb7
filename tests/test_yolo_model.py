"""The Darknet model from .cfg files, its Darknet .weights reader/writer and NMS."""

from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedml_api.model.YOLOv3 import (
    CFG_DIR,
    Darknet,
    create_model,
    darknet_weight_count,
    load_darknet_weights,
    non_max_suppression,
    parse_cfg,
    resolve_cfg_path,
    save_darknet_weights,
)
from fedml_core.aggregation import ClientUpdate, FedAvg
from fedml_core.distributed.communication.packed_tensors import PackedTensors

# Small tensors gain nothing from more threads; on a busy machine a second one can
# make them many times slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

YOLOV3 = CFG_DIR / "yolov3.cfg"
TINY = CFG_DIR / "yolov3-tiny.cfg"
# Sizes of the files Darknet's authors publish for these networks (20-byte header, float32s).
YOLOV3_WEIGHTS_BYTES = 248_007_048
TINY_WEIGHTS_BYTES = 35_434_956
DARKNET53_CONV74_BYTES = 162_482_580


@pytest.fixture(scope="module")
def yolov3():
    return Darknet(YOLOV3)


@pytest.fixture(scope="module")
def tiny():
    return Darknet(TINY)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cfg_parsing_gives_the_known_parameter_counts(yolov3, tiny):
    assert num_parameters(yolov3) == 61_949_149
    assert num_parameters(tiny) == 8_852_366
    assert len(yolov3.module_list) == 107 and len(tiny.module_list) == 24
    assert [layer.stride for layer in yolov3.yolo_layers] == [32, 16, 8]
    assert [layer.stride for layer in tiny.yolo_layers] == [32, 16]
    assert yolov3.num_classes == tiny.num_classes == 80
    assert yolov3.yolo_layers[0].anchors.tolist() == [[116, 90], [156, 198], [373, 326]]


def test_the_weights_layout_matches_the_published_darknet_files(yolov3, tiny):
    assert 20 + 4 * darknet_weight_count(yolov3) == YOLOV3_WEIGHTS_BYTES
    assert 20 + 4 * darknet_weight_count(tiny) == TINY_WEIGHTS_BYTES
    # The Darknet-53 backbone file holds layers 0..74 of yolov3.cfg.
    assert 20 + 4 * darknet_weight_count(yolov3, cutoff=75) == DARKNET53_CONV74_BYTES


def test_forward_shapes_and_decoded_boxes(tiny, yolov3):
    images = torch.rand(2, 3, 96, 64)
    tiny.eval()
    with torch.no_grad():
        raw = tiny(images)
        decoded = tiny.predict(images)
    assert [list(r.shape) for r in raw] == [[2, 3, 3, 2, 85], [2, 3, 6, 4, 85]]
    assert list(decoded.shape) == [2, 3 * (6 + 24), 85]
    assert ((decoded[..., 4:] >= 0) & (decoded[..., 4:] <= 1)).all() and (decoded[..., 2:4] > 0).all()
    yolov3.eval()
    with torch.no_grad():
        assert [list(r.shape) for r in yolov3(torch.rand(1, 3, 64, 64))] == [
            [1, 3, 2, 2, 85], [1, 3, 4, 4, 85], [1, 3, 8, 8, 85]
        ]
    with pytest.raises(ValueError, match="multiple of the network's stride 32"):
        tiny(torch.rand(1, 3, 100, 64))


def test_the_state_dict_holds_batchnorm_buffers_but_not_the_anchors(tiny):
    state = tiny.state_dict()
    assert "module_list.0.bn.running_mean" in state and "module_list.0.bn.num_batches_tracked" in state
    assert not any("anchors" in key for key in state)
    assert sum(v.numel() for k, v in state.items() if "running_" in k) == sum(
        m.bn.num_features * 2 for m in tiny.module_list if getattr(m, "bn", None) is not None
    )


def test_fedavg_of_two_models_round_trips_into_the_network(tiny):
    first = {k: v.clone() for k, v in tiny.state_dict().items()}
    second = {k: (v + 1 if v.is_floating_point() else v) for k, v in first.items()}
    strategy = FedAvg()
    for client, (state, n) in enumerate(((first, 1), (second, 3)), start=1):
        strategy.add(ClientUpdate(client, PackedTensors.from_tensors(state), n))
    averaged = strategy.aggregate(PackedTensors.from_tensors(first)).tensors()
    model = Darknet(TINY)
    model.load_state_dict(averaged)
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, first[key] + 0.75), key


def test_weights_write_read_round_trip_is_bit_exact(tmp_path: Path):
    torch.manual_seed(1)
    source = Darknet(TINY)
    with torch.no_grad():  # non-trivial batch-norm statistics
        for module in source.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    path = save_darknet_weights(source, tmp_path / "tiny.weights", seen=12345)
    assert path.stat().st_size == TINY_WEIGHTS_BYTES
    torch.manual_seed(2)
    target = Darknet(TINY)
    assert load_darknet_weights(target, path) == 13  # all convolutional layers
    for (key, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        if "num_batches_tracked" not in key:
            assert torch.equal(a, b), key
    again = save_darknet_weights(target, tmp_path / "again.weights", seen=12345)
    assert again.read_bytes() == path.read_bytes()
    header = np.fromfile(path, dtype="<i4", count=3).tolist()
    assert header == [0, 2, 0] and np.fromfile(path, dtype="<i8", count=1, offset=12)[0] == 12345


def test_a_backbone_file_loads_its_layers_and_leaves_the_rest(tmp_path: Path):
    torch.manual_seed(3)
    source = Darknet(TINY)
    path = save_darknet_weights(source, tmp_path / "backbone.weights", cutoff=10)
    torch.manual_seed(4)
    target = Darknet(TINY)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    assert load_darknet_weights(target, path) == 5  # conv layers 0, 2, 4, 6, 8
    state = target.state_dict()
    assert torch.equal(state["module_list.8.conv.weight"], source.state_dict()["module_list.8.conv.weight"])
    assert torch.equal(state["module_list.10.conv.weight"], before["module_list.10.conv.weight"])


def test_the_reader_accepts_old_headers_and_rejects_files_of_another_network(tmp_path: Path):
    torch.manual_seed(5)
    model = Darknet(TINY)
    full = save_darknet_weights(model, tmp_path / "full.weights").read_bytes()
    # Version 0.1.0 stores `seen` as int32: the same values behind a 16-byte header.
    old = tmp_path / "old.weights"
    old.write_bytes(np.array([0, 1, 0, 7], dtype="<i4").tobytes() + full[20:])
    other = Darknet(TINY)
    assert load_darknet_weights(other, old) == 13
    assert torch.equal(other.state_dict()["module_list.22.conv.bias"], model.state_dict()["module_list.22.conv.bias"])

    cut = tmp_path / "cut.weights"
    cut.write_bytes(full[:-400])
    with pytest.raises(ValueError, match="ends inside layer 22"):
        load_darknet_weights(Darknet(TINY), cut)
    longer = tmp_path / "longer.weights"
    longer.write_bytes(full + b"\0" * 8)
    with pytest.raises(ValueError, match="written for another network"):
        load_darknet_weights(Darknet(TINY), longer)
    with pytest.raises(ValueError, match="header"):
        (tmp_path / "short.weights").write_bytes(b"\0" * 6)
        load_darknet_weights(Darknet(TINY), tmp_path / "short.weights")


def test_create_model_resolves_shipped_cfgs_and_loads_pretrained_weights(tmp_path: Path):
    torch.manual_seed(6)
    weights = save_darknet_weights(Darknet(TINY), tmp_path / "w.weights")
    args = Namespace(model_def="yolov3-tiny.cfg", pretrained_weights=str(weights), img_size=64)
    model = create_model(args)
    assert model.cfg_path == str(TINY)
    assert load_darknet_weights(Darknet(TINY), weights) == 13
    reference = Darknet(TINY)
    load_darknet_weights(reference, weights)
    assert torch.equal(model.state_dict()["module_list.0.conv.weight"], reference.state_dict()["module_list.0.conv.weight"])
    assert resolve_cfg_path("yolov3") == YOLOV3
    with pytest.raises(FileNotFoundError, match="yolov3-tiny.cfg, yolov3.cfg"):
        resolve_cfg_path("yolov9.cfg")
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model(Namespace(model_def="yolov3-tiny", pretrained_weights=None, img_size=100))


@pytest.mark.parametrize("text, message", [
    ("[convolutional]\nfilters=8\n", "first section must be \\[net\\]"),
    ("[net]\nwidth=64\n", "defines no layers"),
    ("[net]\n[convolutional]\nfilters=8\nfilters=4\n", "repeated"),
    ("[net]\n[convolutional]\nsize=3\n", "bad.cfg:2 \\[convolutional\\]: missing required option 'filters'"),
    ("[net]\n[convolutional]\nfilters=x\n", "not an integer"),
    ("[net]\n[dropout]\n", "unsupported layer type \\[dropout\\]"),
    ("[net]\n[convolutional]\nfilters=8\nactivation=leaky\n[route]\nlayers=1\n", "not an earlier layer"),
    ("[net]\n[convolutional]\nbatch_normalize=1\nfilters=6\nactivation=leaky\n[yolo]\nmask=0\nanchors=1,2\nclasses=1\n",
     "must follow a \\[convolutional\\] layer without batch_normalize"),
    ("[net]\n[convolutional]\nfilters=8\nactivation=linear\n[yolo]\nmask=0\nanchors=1,2\nclasses=1\n",
     "filters=8, but the \\[yolo\\] layer after it needs 1 anchors x \\(5 \\+ 1 classes\\) = 6"),
])
def test_malformed_cfg_files_are_rejected_with_a_clear_message(tmp_path: Path, text, message):
    path = tmp_path / "bad.cfg"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        Darknet(path)


def test_parse_cfg_reads_sections_in_order():
    sections = parse_cfg(TINY)
    assert sections[0].type == "net" and sections[0].get_int("width") == 416
    assert [s.type for s in sections[1:4]] == ["convolutional", "maxpool", "convolutional"]
    assert sections[-1].get_ints("mask") == [0, 1, 2]


def test_maxpool_with_stride_one_keeps_the_size_like_darknet(tiny):
    pool = tiny.module_list[11]
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = pool(x)
    assert out.shape == x.shape
    assert out[0, 0].tolist() == [[5, 6, 7, 7], [9, 10, 11, 11], [13, 14, 15, 15], [13, 14, 15, 15]]


def test_nms_keeps_the_best_box_per_class_and_object():
    # Two overlapping boxes of class 0, one of class 1 in the same place, one faint box.
    pred = torch.zeros(1, 4, 5 + 2)
    pred[0, :, :4] = torch.tensor([[20, 20, 10, 10], [21, 20, 10, 10], [20, 20, 10, 10], [50, 50, 4, 4]])
    pred[0, :, 4] = torch.tensor([0.9, 0.8, 0.9, 0.9])
    pred[0, :, 5:] = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.5], [0.0005, 0.0]])
    (dets,) = non_max_suppression(pred, conf_threshold=0.001, iou_threshold=0.5)
    assert dets[:, 5].tolist() == [0.0, 1.0]
    assert dets[:, 4].tolist() == pytest.approx([0.9, 0.45])
    assert dets[0, :4].tolist() == [15, 15, 25, 25]
