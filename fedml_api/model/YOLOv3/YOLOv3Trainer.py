"""Local training and testing of a Darknet detector on one client's YOLO-format data."""

from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path
from typing import Any, Dict, Hashable, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedml_api.data.memory_cache import CLIENT_DATA_CACHE
from fedml_api.data.yolo_dataset import YoloDataset, collate_detections, count_yolo_images
from fedml_api.data.yolo_transforms import DetectionAugmentation
from fedml_api.utils.lr_schedule import learning_rate_for_round
from fedml_api.model.YOLOv3.darknet import Darknet
from fedml_api.model.YOLOv3.evaluation import EvaluationSettings, collect_match_stats
from fedml_api.model.YOLOv3.loss import yolo_loss
from fedml_api.model.YOLOv3.metrics import evaluate_matches
from fedml_core.trainer.model_trainer import ModelTrainer

#: Values accepted for ``args.optimizer``.
OPTIMIZERS = ("adamw", "sgd")
#: Gradients are clipped to this global norm: early YOLO training has rare huge steps.
MAX_GRAD_NORM = 10.0

logger = logging.getLogger(__name__)


def augmentation_from_args(args: Namespace) -> Optional[DetectionAugmentation]:
    """The training augmentation that ``args`` asks for (``None`` with ``--no_augment``)."""
    if getattr(args, "no_augment", False):
        return None
    return DetectionAugmentation(
        scale=args.aug_scale,
        translate=args.aug_translate,
        flip=args.aug_flip,
        hsv_h=args.aug_hsv_h,
        hsv_s=args.aug_hsv_s,
        hsv_v=args.aug_hsv_v,
    )


class YOLOv3Trainer(ModelTrainer):
    """Trains and tests a :class:`Darknet` detector on a client's YOLO-format folders.

    ``train_path`` and ``test_path`` hold ``images/`` and ``labels/`` (see
    :mod:`fedml_api.data.yolo_dataset`). The datasets are built on first use and kept,
    with their decoded images, for the following rounds, in the process's client-data
    cache (:mod:`fedml_api.data.memory_cache`): unbounded by default; under a budget
    (``set_cache_budget``) the least recently used ones are dropped, and a dataset is
    counted at its size after each train or test that reads it (its images are decoded
    as they are first read).
    """

    model: Darknet

    def get_local_sample_number(self, train_path: str) -> int:
        """Number of images under ``<train_path>/images`` (this client's FedAvg weight)."""
        return count_yolo_images(train_path)

    def train(self, device: torch.device, args: Namespace, train_path: str) -> None:
        """Run ``args.epochs`` local epochs on the client's training images.

        Reads from ``args``: ``img_size``, ``epochs``, ``batch_size``, ``optimizer``
        (``adamw`` or ``sgd``), ``lr``, ``momentum`` (SGD only), ``wd`` (weight decay of the
        convolution weights only), ``lr_schedule`` and ``comm_round`` with ``round_idx``
        (the 0-based round, set by the federation; 0 when absent), and the augmentation
        options (see :func:`augmentation_from_args`).

        Batches are shuffled and augmented from torch's global RNG, so a seeded run is
        reproducible. A fresh optimiser is built every round: its state belongs to the
        previous local model, not to the new global one.
        """
        augmentation = augmentation_from_args(args)
        key, dataset = self._dataset(train_path, args.img_size, augmentation)
        lr = learning_rate_for_round(
            args.lr, args.lr_schedule, getattr(args, "round_idx", 0), args.comm_round
        )
        model = self.model.to(device)
        model.train()
        optimizer = _build_optimizer(model, args.optimizer, lr, args.momentum, args.wd)
        loader = DataLoader(
            dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate_detections
        )
        for epoch in range(args.epochs):
            totals = torch.zeros(4)
            num_batches = 0
            for images, targets in loader:
                images = images.to(device, non_blocking=True).float().div_(255.0)
                loss, parts = yolo_loss(model(images), targets.to(device), model.yolo_layers)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                optimizer.step()
                totals += torch.stack([loss.detach(), parts["box"], parts["objectness"], parts["class"]]).cpu()
                num_batches += 1
            mean = (totals / max(num_batches, 1)).tolist()
            logger.info(
                "%s: epoch %d/%d, lr %.5f, %d steps, mean loss %.4f (box %.4f, objectness %.4f, class %.4f)",
                train_path, epoch + 1, args.epochs, lr, num_batches, *mean,
            )
        _keep(key, dataset)

    def test(self, device: torch.device, args: Namespace, test_path: str) -> Dict[str, Any]:
        """Evaluate on the client's test images (letterboxed, no augmentation).

        Reads from ``args``: ``img_size``, ``test_batch_size``, ``conf_thres``, ``nms_iou``,
        ``max_det`` and ``match_stats``.

        Returns:
            ``precision``, ``recall``, ``mAP50``, ``mAP50_95`` (see
            :func:`fedml_api.model.YOLOv3.metrics.evaluate_matches`), ``loss`` (mean per
            batch), ``num_images`` and ``num_ground_truth``; with ``args.match_stats``,
            also ``match_stats``: this client's per-detection match statistics
            (:meth:`MatchStats.to_json`), from which :class:`YOLOv3ResultAggregator`
            computes the exact metrics of the union of all clients' test sets.
        """
        key, dataset = self._dataset(test_path, args.img_size, None)
        loader = DataLoader(
            dataset, batch_size=args.test_batch_size, shuffle=False, collate_fn=collate_detections
        )
        settings = EvaluationSettings(args.conf_thres, args.nms_iou, args.max_det)
        stats, loss = collect_match_stats(self.model.to(device), loader, device, settings)
        _keep(key, dataset)
        metrics = evaluate_matches(stats)
        result: Dict[str, Any] = dict(metrics.summary())
        result.update(
            loss=loss,
            num_images=stats.num_images,
            num_ground_truth=int(stats.gt_counts.sum()),
        )
        logger.info(
            "%s: %d images, %d objects: precision %.4f recall %.4f mAP50 %.4f mAP50_95 %.4f",
            test_path, stats.num_images, result["num_ground_truth"], result["precision"],
            result["recall"], result["mAP50"], result["mAP50_95"],
        )
        if args.match_stats:
            result["match_stats"] = stats.to_json()
        return result

    def _dataset(
        self, path: str, image_size: int, augmentation: Optional[DetectionAugmentation]
    ) -> Tuple[Hashable, YoloDataset]:
        """The dataset of ``path`` from the cache, else built; with its cache key, under
        which :func:`_keep` stores it once read."""
        key = ("yolo", str(Path(path).resolve()), image_size, augmentation)
        dataset = CLIENT_DATA_CACHE.get(key)
        if dataset is None:
            dataset = YoloDataset(path, image_size, augmentation)
        # Checked on every use: the cache is the process's, shared by every trainer in it.
        if dataset.max_class >= self.model.num_classes:
            raise ValueError(
                f"{path} has labels of class {dataset.max_class}, but the model "
                f"({self.model.cfg_path}) detects {self.model.num_classes} classes "
                f"(0..{self.model.num_classes - 1})"
            )
        return key, dataset


def _keep(key: Hashable, dataset: YoloDataset) -> None:
    """(Re)store ``dataset`` in the cache at its size now that its images are decoded."""
    CLIENT_DATA_CACHE.put(key, dataset, dataset.nbytes)


def _build_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum); weight decay on convolution weights only, since
    decaying batch-norm scales and biases only shrinks them without regularising."""
    decay: List[nn.Parameter] = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
