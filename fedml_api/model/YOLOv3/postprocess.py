"""From decoded network outputs to final detections: score threshold and per-class NMS."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torchvision.ops import batched_nms, box_convert


def non_max_suppression(
    predictions: torch.Tensor,
    conf_threshold: float = 0.001,
    iou_threshold: float = 0.6,
    max_detections: int = 100,
    image_size: Optional[Tuple[int, int]] = None,
) -> List[torch.Tensor]:
    """Select each image's detections from :meth:`Darknet.predict`'s output.

    A box's score is ``objectness * probability of its most likely class``. Boxes scoring
    at most ``conf_threshold`` are dropped; the rest go through NMS per class
    (``torchvision.ops.batched_nms``): among boxes of the same class overlapping by an IoU
    above ``iou_threshold``, only the highest-scoring survives. The ``max_detections``
    best survivors are kept (COCO evaluates at most 100 per image).

    Args:
        predictions: ``[B, N, 5 + C]``, ``(cx, cy, w, h)`` in pixels, objectness, class
            probabilities.
        conf_threshold: Minimum score; the low default keeps the whole precision-recall
            curve for mAP.
        iou_threshold: NMS overlap threshold.
        max_detections: Detections kept per image.
        image_size: ``(height, width)`` of the input; when given, boxes are clipped to it.

    Returns:
        One float tensor ``[K, 6]`` per image, rows ``(x1, y1, x2, y2, score, class)``,
        sorted by decreasing score.
    """
    if predictions.dim() != 3 or predictions.shape[-1] < 6:
        raise ValueError(f"predictions must be [B, N, 5 + C], got {list(predictions.shape)}")
    results = []
    for image_pred in predictions:
        scores, classes = (image_pred[:, 5:] * image_pred[:, 4:5]).max(dim=1)
        keep = scores > conf_threshold
        boxes = box_convert(image_pred[keep, :4], "cxcywh", "xyxy")
        scores, classes = scores[keep], classes[keep]
        if image_size is not None:
            height, width = image_size
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        kept = batched_nms(boxes, scores, classes, iou_threshold)[:max_detections]
        results.append(
            torch.cat((boxes[kept], scores[kept, None], classes[kept, None].to(boxes.dtype)), dim=1)
        )
    return results
