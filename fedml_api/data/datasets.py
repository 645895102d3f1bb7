"""What the training code needs to know about each image dataset, in one registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class ImageDatasetSpec:
    """Static facts about an image-classification dataset.

    Attributes:
        name: Registry key, also stored in every client's ``data.h5``.
        channels: Colour channels ``C`` of the stored images.
        image_size: Height and width ``H == W`` in pixels.
        num_classes: Number of labels; labels are ``0 .. num_classes - 1``.
        mean: Per-channel pixel mean on the ``[0, 1]`` scale (stored uint8 / 255).
        std: Per-channel pixel standard deviation on the same scale.
        crop_padding: Zero padding, in pixels, for random-crop augmentation
            (0 disables cropping).
        horizontal_flip: Whether a mirrored image keeps its label, i.e. whether
            random horizontal flips are a valid augmentation.
    """

    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_padding: int
    horizontal_flip: bool

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"dataset {self.name!r}: mean and std need one value per channel "
                f"({self.channels}), got {len(self.mean)} and {len(self.std)}"
            )


IMAGE_DATASETS: Dict[str, ImageDatasetSpec] = {
    "cifar10": ImageDatasetSpec(
        name="cifar10",
        channels=3,
        image_size=32,
        num_classes=10,
        # Statistics of the 50,000 training images.
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        crop_padding=4,
        horizontal_flip=True,
    ),
    "digits": ImageDatasetSpec(
        name="digits",
        channels=1,
        image_size=8,
        num_classes=10,
        # Statistics of all 1,797 images after scaling 0..16 to uint8 0..255
        # (see fedml_api.data.digits), so they hold for any train/test split seed.
        mean=(0.3053,),
        std=(0.3759,),
        crop_padding=1,
        # A mirrored 2, 3, 4, 5, 7 or 9 is no longer that digit.
        horizontal_flip=False,
    ),
}


def get_image_dataset_spec(name: str) -> ImageDatasetSpec:
    """Return the registered spec for ``name``; ValueError listing the known names otherwise."""
    try:
        return IMAGE_DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(IMAGE_DATASETS))
        raise ValueError(f"unknown image dataset {name!r}; known datasets: {known}") from None
