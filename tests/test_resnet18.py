"""Specification of the ResNet18 package: models, augmentation, trainer, result aggregator, args."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from fedml_api.data.client_data import write_client_split
from fedml_api.data.datasets import get_image_dataset_spec
from fedml_api.data.digits import load_digits_dataset
from fedml_api.utils.lr_schedule import learning_rate_for_round
from fedml_api.model.ResNet18 import (
    ResNet18,
    ResNet18ResultAggregator,
    ResNet18Trainer,
    add_resnet18_args,
    augment_batch,
    create_model,
    normalize_batch,
    torchvision_resnet18,
)

CIFAR10 = get_image_dataset_spec("cifar10")
DIGITS = get_image_dataset_spec("digits")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """Keep these tests light on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _args(**overrides) -> Namespace:
    """The model's default arguments plus the federation's comm_round."""
    args = add_resnet18_args(argparse.ArgumentParser()).parse_args([])
    args.comm_round = 10
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- models ----------------------------------------------------------------------------------


def test_resnet18_has_the_standard_cifar_parameter_count():
    assert _num_parameters(ResNet18(num_classes=10, in_channels=3, width=64)) == 11_173_962


@pytest.mark.parametrize(
    "dataset, width, input_shape",
    [("cifar10", 64, (2, 3, 32, 32)), ("digits", 16, (2, 1, 8, 8))],
)
def test_create_model_fits_the_dataset_spec(dataset, width, input_shape):
    model = create_model(_args(dataset=dataset, resnet_width=width)).eval()
    with torch.no_grad():
        assert model(torch.randn(input_shape)).shape == (2, 10)


def test_resnet_width_scales_every_stage():
    model = ResNet18(num_classes=3, in_channels=1, width=8)
    assert model.conv1.out_channels == 8 and model.layer4[1].conv2.out_channels == 64
    assert model.fc.out_features == 3


def test_torchvision_variant_builds_for_grayscale_input():
    model = torchvision_resnet18(num_classes=10, in_channels=1).eval()
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert isinstance(create_model(_args(model="resnet18_imagenet")), torch.nn.Module)


def test_create_model_rejects_unknown_models_and_a_width_torchvision_cannot_build():
    with pytest.raises(
        ValueError, match="unknown model 'vgg'; expected one of resnet18, resnet18_imagenet"
    ):
        create_model(_args(model="vgg"))
    with pytest.raises(ValueError, match="not supported by resnet18_imagenet"):
        create_model(_args(model="resnet18_imagenet", resnet_width=32))


# --- augmentation and normalisation ----------------------------------------------------------


def _random_images(batch: int, spec) -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    shape = (batch, spec.channels, spec.image_size, spec.image_size)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)


def _matching_transforms(source: torch.Tensor, output: torch.Tensor, padding: int):
    """Every (dy, dx, flipped) for which ``output`` is that crop of zero-padded ``source``."""
    size = source.shape[-1]
    padded = F.pad(source, (padding,) * 4)
    for dy, dx, flipped in itertools.product(
        range(2 * padding + 1), range(2 * padding + 1), (False, True)
    ):
        crop = padded[:, dy : dy + size, dx : dx + size]
        if torch.equal(crop.flip(-1) if flipped else crop, output):
            yield dy, dx, flipped


def test_augmentation_keeps_shape_and_dtype_and_is_deterministic_under_a_seed():
    images = _random_images(16, CIFAR10)
    first = augment_batch(images, CIFAR10, torch.Generator().manual_seed(7))
    again = augment_batch(images, CIFAR10, torch.Generator().manual_seed(7))
    other = augment_batch(images, CIFAR10, torch.Generator().manual_seed(8))
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.manual_seed(7)
    from_global = augment_batch(images, CIFAR10)
    torch.manual_seed(7)
    assert torch.equal(from_global, augment_batch(images, CIFAR10))


def test_augmentation_is_a_padded_random_crop_with_random_flips():
    images = _random_images(32, CIFAR10)
    output = augment_batch(images, CIFAR10, torch.Generator().manual_seed(0))
    found = [
        list(_matching_transforms(images[i], output[i], CIFAR10.crop_padding)) for i in range(32)
    ]
    assert all(len(matches) == 1 for matches in found)
    transforms = [matches[0] for matches in found]
    assert len({(dy, dx) for dy, dx, _ in transforms}) > 1  # offsets vary within the batch
    assert {flipped for _, _, flipped in transforms} == {False, True}


def test_digits_are_cropped_but_never_mirrored():
    images = _random_images(32, DIGITS)
    output = augment_batch(images, DIGITS, torch.Generator().manual_seed(0))
    for i in range(32):
        matches = list(_matching_transforms(images[i], output[i], DIGITS.crop_padding))
        assert [flipped for _, _, flipped in matches] == [False]


def test_normalisation_maps_the_dataset_mean_to_zero_and_one_std_to_one():
    mean_pixel = torch.tensor([round(m * 255) for m in CIFAR10.mean], dtype=torch.uint8)
    images = mean_pixel.view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous()
    normalised = normalize_batch(images, CIFAR10)
    assert normalised.dtype == torch.float32 and normalised.abs().max() < 0.01
    with pytest.raises(
        ValueError, match=r"cifar10 images have 3 channels: expected \[B, 3, H, W\]"
    ):
        normalize_batch(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), CIFAR10)


def test_learning_rate_schedules():
    assert learning_rate_for_round(0.1, "constant", 9, 10) == 0.1
    cosine = [learning_rate_for_round(0.1, "cosine", r, 10) for r in range(10)]
    assert cosine[0] == pytest.approx(0.1) and cosine[5] == pytest.approx(0.05)
    assert all(a > b > 0 for a, b in zip(cosine, cosine[1:]))
    with pytest.raises(ValueError, match=r"round_idx must be in \[0, 10\)"):
        learning_rate_for_round(0.1, "cosine", 10, 10)
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
        learning_rate_for_round(0.1, "step", 0, 10)


# --- trainer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_client(tmp_path_factory) -> Path:
    """A client folder with 300 real digits for training and 100 for testing."""
    root = tmp_path_factory.mktemp("client")
    train_images, train_labels, test_images, test_labels = load_digits_dataset(seed=0)
    write_client_split(root / "train", train_images[:300], train_labels[:300], "digits")
    write_client_split(root / "test", test_images[:100], test_labels[:100], "digits")
    return root


def _digits_trainer(seed: int = 0) -> ResNet18Trainer:
    torch.manual_seed(seed)
    return ResNet18Trainer(ResNet18(num_classes=10, in_channels=1, width=8))


def test_local_sample_number_is_the_training_set_size(digits_client):
    assert _digits_trainer().get_local_sample_number(str(digits_client / "train")) == 300


def test_a_few_local_epochs_reduce_the_loss(digits_client):
    trainer = _digits_trainer()
    # Ten epochs, not two or three: the evaluation uses BatchNorm's running statistics,
    # which lag far behind the weights during the first few dozen steps.
    args = _args(dataset="digits", epochs=10, batch_size=32, lr=0.05, lr_schedule="constant")
    before = trainer.test(CPU, args, str(digits_client / "train"))["loss"]
    trainer.train(CPU, args, str(digits_client / "train"))
    after = trainer.test(CPU, args, str(digits_client / "train"))["loss"]
    assert after < 0.7 * before


def test_training_is_reproducible_under_torch_manual_seed(digits_client):
    args = _args(dataset="digits", batch_size=64, round_idx=3)
    states = []
    for _ in range(2):
        trainer = _digits_trainer(seed=1)
        trainer.train(CPU, args, str(digits_client / "train"))
        states.append(trainer.get_model_params())
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_test_returns_json_serialisable_accuracy_and_loss(digits_client):
    result = _digits_trainer().test(
        CPU, _args(dataset="digits", test_batch_size=32), str(digits_client / "test")
    )
    assert set(result) == {"accuracy", "loss"}
    assert type(result["accuracy"]) is float and type(result["loss"]) is float
    assert 0.0 <= result["accuracy"] <= 1.0 and math.isfinite(result["loss"])
    assert json.loads(json.dumps(result)) == result


def test_test_batch_size_does_not_change_the_metrics(digits_client):
    trainer = _digits_trainer()
    args = _args(dataset="digits")
    del args.test_batch_size  # falls back to the default
    full = trainer.test(CPU, args, str(digits_client / "test"))
    small = trainer.test(
        CPU, _args(dataset="digits", test_batch_size=7), str(digits_client / "test")
    )
    assert small["accuracy"] == full["accuracy"]
    assert small["loss"] == pytest.approx(full["loss"], rel=1e-5)


def test_data_of_another_dataset_is_rejected(digits_client):
    with pytest.raises(
        ValueError, match="holds 'digits' data but the model was built for --dataset 'cifar10'"
    ):
        _digits_trainer().test(CPU, _args(dataset="cifar10"), str(digits_client / "test"))


# --- result aggregation and arguments --------------------------------------------------------


def test_result_aggregator_weights_clients_by_sample_number():
    combined = ResNet18ResultAggregator().aggregate_result(
        {
            0: {"result": {"accuracy": 1.0, "loss": 0.0, "num_samples": 1}, "sample_number": 1},
            1: {"result": {"accuracy": 0.0, "loss": 2.0, "num_samples": 3}, "sample_number": 3},
        }
    )
    assert combined["accuracy"] == pytest.approx(0.25)
    assert combined["loss"] == pytest.approx(1.5)
    assert combined["sample_number"] == 4


def test_resnet18_arguments_defaults_and_validation(capsys):
    args = add_resnet18_args(argparse.ArgumentParser()).parse_args([])
    assert vars(args) == {
        "model": "resnet18",
        "dataset": "cifar10",
        "resnet_width": 64,
        "epochs": 1,
        "batch_size": 64,
        "test_batch_size": 256,
        "lr": 0.05,
        "momentum": 0.9,
        "wd": 5e-4,
        "lr_schedule": "cosine",
    }
    with pytest.raises(SystemExit):
        add_resnet18_args(argparse.ArgumentParser()).parse_args(["--batch_size", "0"])
    assert "argument --batch_size: must be an integer >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        add_resnet18_args(argparse.ArgumentParser()).parse_args(["--lr", "fast"])
    assert "argument --lr: must be a number >= 0, got 'fast'" in capsys.readouterr().err
