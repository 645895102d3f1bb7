"""scikit-learn's bundled 8x8 handwritten digits: a tiny real dataset that needs no download."""

from __future__ import annotations

from typing import Tuple

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

# load_digits stores each pixel as a count 0..16 (ink in a 4x4 block of the original scan).
_MAX_PIXEL = 16.0


def load_digits_dataset(
    seed: int, test_fraction: float = 0.2
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load the 1,797 digits and split them into train and test sets.

    Pixels are rescaled from 0..16 to uint8 0..255 so that every image dataset of the
    project is stored and normalised the same way.

    Args:
        seed: Seed of the stratified train/test split (same seed, same split).
        test_fraction: Share of the images in the test set, strictly between 0 and 1.

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: images uint8
        ``[N, 8, 8, 1]`` (NHWC), labels int64 ``[N]`` in 0..9; every class keeps its share
        in both sets.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / _MAX_PIXEL)).astype(np.uint8)[..., np.newaxis]
    labels = digits.target.astype(np.int64)
    train_images, test_images, train_labels, test_labels = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    return train_images, train_labels, test_images, test_labels
