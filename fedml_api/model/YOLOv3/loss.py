"""The YOLOv3 training loss: box regression, objectness and classification.

Targets are assigned per head: a ground-truth box is the responsibility of the grid cell
that holds its centre, for every anchor of the head whose width and height are both within
a factor :attr:`YoloLossConfig.anchor_ratio_threshold` of the box's. (Darknet assigns
only the single best anchor of all heads; allowing every close enough anchor gives each
box several positives, which trains faster on small datasets.)

* box: ``1 - CIoU`` between the predicted and the true box of every positive;
* objectness: binary cross-entropy on every cell and anchor, the target being the
  positive's (detached, non-negative) IoU with its box and 0 elsewhere, so the score
  learns to rank boxes by localisation quality, which is what mAP rewards;
* class: binary cross-entropy of the positives' class logits against one-hot targets.

Each term is a mean, so the loss does not grow with the batch size or the image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Sequence, Tuple

import torch
from torch.nn import functional as F
from torchvision.ops import box_convert, complete_box_iou_loss

from fedml_api.model.YOLOv3.darknet import MAX_LOG_SCALE, YOLOLayer

#: Weight of a head's objectness term by its stride: fine grids have many more cells,
#: mostly background, whose mean loss is smaller and needs a larger weight.
OBJECTNESS_BALANCE: Mapping[int, float] = {8: 4.0, 16: 1.0, 32: 0.4, 64: 0.1}


@dataclass(frozen=True)
class YoloLossConfig:
    """Weights of the loss terms and the anchor assignment rule."""

    box_weight: float = 0.05
    objectness_weight: float = 1.0
    class_weight: float = 0.5
    anchor_ratio_threshold: float = 4.0


def yolo_loss(
    raw_outputs: Sequence[torch.Tensor],
    targets: torch.Tensor,
    heads: Sequence[YOLOLayer],
    config: YoloLossConfig = YoloLossConfig(),
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Loss of one batch.

    Args:
        raw_outputs: :meth:`Darknet.forward`'s output, ``[B, A, H, W, 5 + C]`` per head.
        targets: float ``[M, 6]`` rows ``(image index in the batch, class, cx, cy, w, h)``,
            box centres and sizes in input pixels (as :func:`collate_detections` makes them).
        heads: The model's ``yolo_layers``, one per raw output.
        config: Term weights and anchor assignment.

    Returns:
        ``(loss, parts)``: the weighted sum (a scalar tensor to backpropagate) and the
        unweighted ``"box"``, ``"objectness"`` and ``"class"`` terms (detached scalars).
    """
    if len(raw_outputs) != len(heads):
        raise ValueError(f"got {len(raw_outputs)} raw outputs for {len(heads)} heads")
    if targets.dim() != 2 or targets.shape[1] != 6:
        raise ValueError(f"targets must be [M, 6] (image, class, cx, cy, w, h), got {list(targets.shape)}")
    device = raw_outputs[0].device
    targets = targets.to(device)
    zero = torch.zeros((), device=device)
    box_loss, objectness_loss, class_loss = zero, zero, zero
    num_box_terms = 0
    for head, raw in zip(heads, raw_outputs):
        batch, num_anchors, height, width, _ = raw.shape
        target_objectness = torch.zeros(raw.shape[:4], device=device, dtype=raw.dtype)
        anchors = head.anchors.to(device) / head.stride  # in grid cells
        if len(targets):
            box_wh = targets[:, 4:6] / head.stride
            ratio = box_wh[None] / anchors[:, None]  # [A, M, 2]
            close = torch.max(ratio, 1 / ratio).amax(dim=2) < config.anchor_ratio_threshold
            anchor_idx, target_idx = close.nonzero(as_tuple=True)
        else:
            anchor_idx = target_idx = torch.zeros(0, dtype=torch.long, device=device)
        if len(target_idx):
            matched = targets[target_idx]
            image_idx, class_idx = matched[:, 0].long(), matched[:, 1].long()
            centre = matched[:, 2:4] / head.stride
            cell_x = centre[:, 0].long().clamp(0, width - 1)
            cell_y = centre[:, 1].long().clamp(0, height - 1)
            pred = raw[image_idx, anchor_idx, cell_y, cell_x]  # [K, 5 + C]
            pred_box = torch.cat(
                (pred[:, 0:2].sigmoid(), pred[:, 2:4].clamp(max=MAX_LOG_SCALE).exp() * anchors[anchor_idx]),
                dim=1,
            )
            cell = torch.stack((cell_x, cell_y), dim=1).to(centre.dtype)
            true_box = torch.cat((centre - cell, matched[:, 4:6] / head.stride), dim=1)
            pred_xyxy = box_convert(pred_box, "cxcywh", "xyxy")
            true_xyxy = box_convert(true_box, "cxcywh", "xyxy")
            box_loss = box_loss + complete_box_iou_loss(pred_xyxy, true_xyxy, reduction="sum")
            num_box_terms += len(target_idx)
            iou = _paired_iou(pred_xyxy.detach(), true_xyxy).clamp(min=0).to(raw.dtype)
            target_objectness[image_idx, anchor_idx, cell_y, cell_x] = iou
            one_hot = F.one_hot(class_idx, head.num_classes).to(pred.dtype)
            class_loss = class_loss + F.binary_cross_entropy_with_logits(
                pred[:, 5:], one_hot, reduction="sum"
            ) / head.num_classes
        balance = OBJECTNESS_BALANCE.get(head.stride, 1.0)
        objectness_loss = objectness_loss + balance * F.binary_cross_entropy_with_logits(
            raw[..., 4], target_objectness
        )
    if num_box_terms:
        box_loss = box_loss / num_box_terms
        class_loss = class_loss / num_box_terms
    total = (
        config.box_weight * box_loss
        + config.objectness_weight * objectness_loss
        + config.class_weight * class_loss
    )
    parts = {
        "box": box_loss.detach(),
        "objectness": objectness_loss.detach(),
        "class": class_loss.detach(),
    }
    return total, parts


def _paired_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of ``boxes1[i]`` with ``boxes2[i]`` (both ``[K, 4]`` xyxy) -> ``[K]``."""
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(dim=1)
    return inter / (area1 + area2 - inter + 1e-9)
