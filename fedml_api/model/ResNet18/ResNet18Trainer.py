"""Local training and testing of an image classifier on one client's data.h5 files."""

from __future__ import annotations

import logging
from argparse import Namespace
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fedml_api.data.client_data import ClientSplit, count_client_samples, load_client_split
from fedml_api.data.datasets import ImageDatasetSpec, get_image_dataset_spec
from fedml_api.utils.lr_schedule import learning_rate_for_round
from fedml_core.trainer.model_trainer import ModelTrainer

#: Evaluation batch size when ``args`` has no ``test_batch_size``.
DEFAULT_TEST_BATCH_SIZE = 256

logger = logging.getLogger(__name__)


def augment_batch(
    images: torch.Tensor, spec: ImageDatasetSpec, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Random crop and (if the dataset allows it) random horizontal flip of a whole batch.

    Each image is zero-padded by ``spec.crop_padding`` pixels on every side, cropped back
    to its size at a random offset and, when ``spec.horizontal_flip``, mirrored with
    probability 1/2: torchvision's ``RandomCrop(size, padding) + RandomHorizontalFlip()``,
    done as one gather over the batch instead of per-sample PIL calls.

    Args:
        images: uint8 ``[B, C, H, W]`` on any device.
        spec: Supplies ``crop_padding`` and ``horizontal_flip``.
        generator: CPU generator for the random draws; ``None`` uses torch's global RNG.
            The draws are made on the CPU whatever the device, so a seed gives the same
            augmentation on a GPU and on the CPU.

    Returns:
        A new uint8 ``[B, C, H, W]`` tensor on ``images.device`` (``images`` itself when
        the spec asks for no augmentation).
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"augment_batch expects uint8 [B, C, H, W], got {images.dtype} {list(images.shape)}"
        )
    pad = spec.crop_padding
    if pad == 0 and not spec.horizontal_flip:
        return images
    batch, channels, height, width = images.shape
    offset_y = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
    offset_x = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
    columns = torch.arange(width).expand(batch, width)
    if spec.horizontal_flip:
        flip = torch.rand(batch, 1, generator=generator) < 0.5
        columns = torch.where(flip, width - 1 - columns, columns)
    # Output pixel (b, c, y, x) is padded pixel (b, c, offset_y + y, offset_x + x'), with
    # x' = W - 1 - x for mirrored images: one advanced-indexing gather does crop and flip.
    rows = (offset_y + torch.arange(height)).to(images.device)
    columns = (offset_x + columns).to(images.device)
    padded = F.pad(images, (pad, pad, pad, pad))
    batch_index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel_index = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], columns[:, None, None, :]]


def normalize_batch(images: torch.Tensor, spec: ImageDatasetSpec) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 ``(images / 255 - spec.mean) / spec.std`` per channel."""
    if images.dim() != 4 or images.shape[1] != spec.channels:
        raise ValueError(
            f"{spec.name} images have {spec.channels} channels: "
            f"expected [B, {spec.channels}, H, W], got {list(images.shape)}"
        )
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return images.float().div_(255.0).sub_(mean).div_(std)


class ResNet18Trainer(ModelTrainer):
    """Trains and tests an image classifier (ResNet-18 by default) on a client's data.

    The data folders hold the ``data.h5`` written by scripts/split_dataset.py; the file
    names its dataset, whose spec (see :mod:`fedml_api.data.datasets`) gives the
    augmentation and normalisation. It must match ``args.dataset``, the dataset the model
    was built for.
    """

    def get_local_sample_number(self, train_path: str) -> int:
        """Number of training samples in ``train_path`` (read from the file's attribute)."""
        return count_client_samples(train_path)

    def train(self, device: torch.device, args: Namespace, train_path: str) -> None:
        """Run ``args.epochs`` local epochs of SGD on the client's training data.

        Reads from ``args``: ``epochs``, ``batch_size``, ``lr``, ``momentum``, ``wd`` (weight
        decay, not applied to BatchNorm parameters and biases), ``lr_schedule`` (see
        :func:`learning_rate_for_round`), ``comm_round`` (the number of federated rounds) and
        ``round_idx``, the 0-based index of the current round, which the federation sets on
        ``args`` before calling ``train`` (0 when absent).

        Batches are reshuffled every epoch with ``torch.randperm`` and augmented with
        :func:`augment_batch`, both drawing from torch's global CPU RNG: a run seeded with
        ``torch.manual_seed`` is reproducible. A fresh optimiser is built every round, since
        momentum from the previous local model does not apply to the new global model.
        """
        data, spec = self._load(train_path, args)
        lr = learning_rate_for_round(
            args.lr, args.lr_schedule, getattr(args, "round_idx", 0), args.comm_round
        )
        args.round_lr = lr  # the rate of this round, for algorithms that need it (SCAFFOLD)
        # channels_last: about 1.3x faster convolutions on CPUs and tensor-core GPUs.
        model = self.model.to(device, memory_format=torch.channels_last)
        model.train()
        optimizer = torch.optim.SGD(
            _parameter_groups(model, args.wd), lr=lr, momentum=args.momentum
        )
        num_samples = len(data)
        for epoch in range(args.epochs):
            order = torch.randperm(num_samples)
            loss_sum = torch.zeros((), device=device)
            num_seen = 0
            for start in range(0, num_samples, args.batch_size):
                index = order[start : start + args.batch_size]
                # BatchNorm cannot normalise a batch of one sample whose last feature map is
                # 1x1 (e.g. 8x8 digits); the skipped sample is seen in another epoch or round.
                if len(index) == 1 and num_samples > 1:
                    continue
                images = augment_batch(data.images[index].to(device, non_blocking=True), spec)
                labels = data.labels[index].to(device, non_blocking=True)
                loss = F.cross_entropy(model(normalize_batch(images, spec)), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(index)
                num_seen += len(index)
            logger.info(
                "%s: epoch %d/%d, lr %.5f, mean train loss %.4f",
                train_path,
                epoch + 1,
                args.epochs,
                lr,
                loss_sum.item() / max(num_seen, 1),
            )

    def test(self, device: torch.device, args: Namespace, test_path: str) -> Dict[str, Any]:
        """Evaluate on the data in ``test_path`` without augmentation.

        Uses ``args.test_batch_size`` when present, else :data:`DEFAULT_TEST_BATCH_SIZE`.

        Returns:
            ``{"accuracy": float in [0, 1], "loss": float (mean cross-entropy per sample)}``,
            plain Python numbers. (The sample count travels beside it as the client's weight.)
        """
        data, spec = self._load(test_path, args)
        batch_size = getattr(args, "test_batch_size", DEFAULT_TEST_BATCH_SIZE)
        model = self.model.to(device, memory_format=torch.channels_last)
        model.eval()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                images = data.images[start : start + batch_size].to(device, non_blocking=True)
                labels = data.labels[start : start + batch_size].to(device, non_blocking=True)
                logits = model(normalize_batch(images, spec))
                loss_sum += F.cross_entropy(logits, labels, reduction="sum")
                correct += (logits.argmax(dim=1) == labels).sum()
        num_samples = len(data)
        return {
            "accuracy": correct.item() / num_samples,
            "loss": loss_sum.item() / num_samples,
        }

    @staticmethod
    def _load(path: str, args: Namespace) -> Tuple[ClientSplit, ImageDatasetSpec]:
        data = load_client_split(path)
        if data.dataset != args.dataset:
            raise ValueError(
                f"{path} holds {data.dataset!r} data but the model was built for "
                f"--dataset {args.dataset!r}"
            )
        return data, get_image_dataset_spec(data.dataset)


def _parameter_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Weight decay for conv and linear weights only: decaying BatchNorm scales and biases
    only shrinks them without regularising the function the network computes."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
