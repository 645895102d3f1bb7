"""Running a detector over a test set: loss, detections and their match statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Tuple

import numpy as np
import torch
from torchvision.ops import box_convert

from fedml_api.model.YOLOv3.darknet import Darknet
from fedml_api.model.YOLOv3.loss import yolo_loss
from fedml_api.model.YOLOv3.metrics import COCO_IOU_THRESHOLDS, MatchStats, match_detections
from fedml_api.model.YOLOv3.postprocess import non_max_suppression


@dataclass(frozen=True)
class EvaluationSettings:
    """How detections are selected for evaluation (see :func:`non_max_suppression`)."""

    conf_threshold: float = 0.001
    nms_iou_threshold: float = 0.6
    max_detections: int = 100


@torch.no_grad()
def collect_match_stats(
    model: Darknet,
    batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    settings: EvaluationSettings = EvaluationSettings(),
) -> Tuple[MatchStats, float]:
    """Evaluate ``model`` (in eval mode) on every batch.

    Args:
        model: The detector.
        batches: ``(images uint8 [B, 3, S, S], targets [M, 6])`` as
            :func:`fedml_api.data.yolo_dataset.collate_detections` makes them.
        device: Where to run the model.
        settings: Detection selection.

    Returns:
        ``(stats, loss)``: the match statistics of all images at the COCO IoU
        thresholds, and the mean training loss per batch (a data-fit measure comparable
        with the training log).
    """
    model.eval()
    confidences, classes, true_positives = [], [], []
    gt_counts = np.zeros(model.num_classes, dtype=np.int64)
    num_images = 0
    loss_sum, num_batches = 0.0, 0
    for images, targets in batches:
        images = images.to(device, non_blocking=True).float().div_(255.0)
        targets = targets.to(device)
        raw = model(images)
        loss, _ = yolo_loss(raw, targets, model.yolo_layers)
        loss_sum += float(loss)
        num_batches += 1
        detections = non_max_suppression(
            model.decode(raw),
            settings.conf_threshold,
            settings.nms_iou_threshold,
            settings.max_detections,
            image_size=tuple(images.shape[-2:]),
        )
        for index, dets in enumerate(detections):
            truth = targets[targets[:, 0] == index]
            gt_classes = truth[:, 1].long()
            gt_counts += np.bincount(gt_classes.cpu().numpy(), minlength=model.num_classes)
            gt_boxes = box_convert(truth[:, 2:6], "cxcywh", "xyxy")
            hits = match_detections(dets[:, :4], dets[:, 4], dets[:, 5].long(), gt_boxes, gt_classes)
            confidences.append(dets[:, 4].cpu().numpy().astype(np.float32))
            classes.append(dets[:, 5].cpu().numpy().astype(np.int64))
            true_positives.append(hits)
            num_images += 1
    if num_images == 0:
        raise ValueError("collect_match_stats: the test set holds no image")
    stats = MatchStats(
        confidence=np.concatenate(confidences),
        pred_class=np.concatenate(classes),
        true_positive=np.concatenate(true_positives),
        gt_counts=gt_counts,
        num_images=num_images,
        iou_thresholds=COCO_IOU_THRESHOLDS,
    )
    return stats, loss_sum / num_batches
