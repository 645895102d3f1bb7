"""Detection metrics: matching, COCO-style average precision, precision and recall.

Evaluation has two steps:

1. :func:`match_detections` decides, image by image, which detections are true
   positives at each IoU threshold (COCO's greedy matching). The result for a whole test
   set is a :class:`MatchStats`: per detection its confidence, class and true-positive
   flags, plus the number of ground-truth objects per class. It is all that mAP needs, and
   the statistics of several test sets concatenate into those of their union.
2. :func:`evaluate_matches` turns a :class:`MatchStats` into :class:`DetectionMetrics`:
   per class AP at every IoU threshold (101-point interpolation, as pycocotools does),
   precision and recall, and their means over the classes.

Differences from pycocotools: there are no crowd annotations and no area ranges (all
boxes count), and a class's AP is averaged only over classes with ground truth in the
evaluated set (as COCO does). ``maxDets`` is the ``max_detections`` of NMS.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

#: IoU thresholds 0.50, 0.55, ..., 0.95 of COCO's mAP@0.5:0.95.
COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
#: Recall levels 0, 0.01, ..., 1 at which COCO interpolates precision.
RECALL_LEVELS = np.linspace(0.0, 1.0, 101)
#: Tag of the JSON form of :class:`MatchStats`.
MATCH_STATS_FORMAT = "yolo-match-stats/1"


def match_detections(
    det_boxes: torch.Tensor,
    det_scores: torch.Tensor,
    det_classes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
) -> np.ndarray:
    """Mark one image's detections as true or false positives at each IoU threshold.

    Detections are visited from the highest score down; each one is matched to the
    not-yet-matched ground-truth box of its class with which it has the highest IoU, if
    that IoU is at least the threshold; otherwise it is a false positive. This is
    pycocotools' rule, applied independently at every threshold.

    Args:
        det_boxes: ``[N, 4]`` ``(x1, y1, x2, y2)``.
        det_scores: ``[N]`` confidences.
        det_classes: ``[N]`` class ids.
        gt_boxes: ``[M, 4]`` in the same coordinates.
        gt_classes: ``[M]`` class ids.
        iou_thresholds: ``T`` thresholds.

    Returns:
        bool ``[N, T]``: ``[i, t]`` is True when detection ``i`` is a true positive at
        threshold ``t``.
    """
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    num_dets = len(det_boxes)
    true_positive = np.zeros((num_dets, len(thresholds)), dtype=bool)
    if num_dets == 0 or len(gt_boxes) == 0:
        return true_positive
    iou = box_iou(det_boxes.double().cpu(), gt_boxes.double().cpu()).numpy()
    same_class = det_classes.cpu().numpy()[:, None] == gt_classes.cpu().numpy()[None, :]
    iou = np.where(same_class, iou, -1.0)
    matched = np.zeros((len(thresholds), len(gt_boxes)), dtype=bool)
    rows = np.arange(len(thresholds))
    for det in np.argsort(-det_scores.cpu().numpy(), kind="stable"):
        candidates = np.where(matched, -1.0, iou[det][None, :])  # [T, M]
        best = candidates.argmax(axis=1)
        best_iou = candidates[rows, best]
        hit = best_iou >= thresholds
        true_positive[det, hit] = True
        matched[rows[hit], best[hit]] = True
    return true_positive


@dataclass(frozen=True)
class MatchStats:
    """Everything mAP needs to know about the detections on a set of images.

    Attributes:
        confidence: float32 ``[N]`` score of every detection.
        pred_class: int64 ``[N]`` its class.
        true_positive: bool ``[N, T]`` its match result at each IoU threshold.
        gt_counts: int64 ``[C]`` ground-truth objects per class.
        num_images: Number of images evaluated.
        iou_thresholds: The ``T`` thresholds.
    """

    confidence: np.ndarray
    pred_class: np.ndarray
    true_positive: np.ndarray
    gt_counts: np.ndarray
    num_images: int
    iou_thresholds: tuple = COCO_IOU_THRESHOLDS

    def __post_init__(self) -> None:
        num = len(self.confidence)
        if self.pred_class.shape != (num,) or self.true_positive.shape != (num, len(self.iou_thresholds)):
            raise ValueError(
                f"MatchStats: expected confidence [N], pred_class [N] and true_positive "
                f"[N, {len(self.iou_thresholds)}], got {list(self.confidence.shape)}, "
                f"{list(self.pred_class.shape)} and {list(self.true_positive.shape)}"
            )

    @classmethod
    def empty(cls, num_classes: int, iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS) -> "MatchStats":
        """Statistics of zero images."""
        return cls(
            confidence=np.zeros(0, dtype=np.float32),
            pred_class=np.zeros(0, dtype=np.int64),
            true_positive=np.zeros((0, len(iou_thresholds)), dtype=bool),
            gt_counts=np.zeros(num_classes, dtype=np.int64),
            num_images=0,
            iou_thresholds=tuple(iou_thresholds),
        )

    @staticmethod
    def concatenate(parts: Sequence["MatchStats"]) -> "MatchStats":
        """The statistics of the union of the parts' image sets (in the given order)."""
        if not parts:
            raise ValueError("MatchStats.concatenate needs at least one part")
        first = parts[0]
        for part in parts[1:]:
            if part.iou_thresholds != first.iou_thresholds or len(part.gt_counts) != len(first.gt_counts):
                raise ValueError(
                    "cannot combine match statistics computed with different IoU thresholds "
                    f"or class counts: {part.iou_thresholds} / {len(part.gt_counts)} classes vs "
                    f"{first.iou_thresholds} / {len(first.gt_counts)} classes"
                )
        return MatchStats(
            confidence=np.concatenate([p.confidence for p in parts]),
            pred_class=np.concatenate([p.pred_class for p in parts]),
            true_positive=np.concatenate([p.true_positive for p in parts]),
            gt_counts=np.sum([p.gt_counts for p in parts], axis=0),
            num_images=sum(p.num_images for p in parts),
            iou_thresholds=first.iou_thresholds,
        )

    def to_json(self) -> Dict[str, Any]:
        """A compact JSON-serialisable dict that :meth:`from_json` restores bit-exactly.

        The per-detection arrays are base64 strings of little-endian binary data: float32
        confidences, uint16 classes, and the true-positive flags packed into bits (two
        bytes per detection for the 10 COCO thresholds): about 11 characters per
        detection, so 100 detections on each of 1,000 images take about 1.1 MB.
        """
        if len(self.gt_counts) > np.iinfo(np.uint16).max + 1:
            raise ValueError(f"{len(self.gt_counts)} classes do not fit the uint16 class field")
        return {
            "format": MATCH_STATS_FORMAT,
            "iou_thresholds": list(self.iou_thresholds),
            "num_images": int(self.num_images),
            "num_detections": int(len(self.confidence)),
            "confidence": _b64(self.confidence.astype("<f4")),
            "pred_class": _b64(self.pred_class.astype("<u2")),
            "true_positive": _b64(np.packbits(self.true_positive, axis=1)),
            "gt_counts": [int(n) for n in self.gt_counts],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "MatchStats":
        """Inverse of :meth:`to_json`; raises ValueError for anything else."""
        if not isinstance(data, Mapping) or data.get("format") != MATCH_STATS_FORMAT:
            raise ValueError(f"not match statistics in format {MATCH_STATS_FORMAT!r}")
        num = int(data["num_detections"])
        thresholds = tuple(float(t) for t in data["iou_thresholds"])
        packed = _unb64(data["true_positive"], np.uint8).reshape(num, (len(thresholds) + 7) // 8)
        return cls(
            confidence=_unb64(data["confidence"], np.dtype("<f4")).astype(np.float32),
            pred_class=_unb64(data["pred_class"], np.dtype("<u2")).astype(np.int64),
            true_positive=np.unpackbits(packed, axis=1, count=len(thresholds)).astype(bool),
            gt_counts=np.asarray(data["gt_counts"], dtype=np.int64),
            num_images=int(data["num_images"]),
            iou_thresholds=thresholds,
        )


@dataclass(frozen=True)
class DetectionMetrics:
    """Per-class and overall detection metrics of one :class:`MatchStats`.

    Only classes with at least one ground-truth object are evaluated (detections of other
    classes are false positives that no class's AP depends on).

    Attributes:
        classes: int64 ``[K]`` the evaluated class ids.
        num_ground_truth: int64 ``[K]`` their ground-truth counts.
        ap: float64 ``[K, T]`` average precision per class and IoU threshold.
        precision: float64 ``[K]`` at IoU 0.5 and :attr:`confidence_threshold`.
        recall: float64 ``[K]`` likewise.
        confidence_threshold: The score threshold that maximises the class-mean F1 at
            IoU 0.5 (precision and recall are reported there, as ultralytics does).
        iou_thresholds: The ``T`` thresholds; the first must be 0.5.
    """

    classes: np.ndarray
    num_ground_truth: np.ndarray
    ap: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    confidence_threshold: float
    iou_thresholds: tuple

    @property
    def map50(self) -> float:
        """Mean over classes of AP at IoU 0.5 (NaN when there is no ground truth)."""
        return float(self.ap[:, 0].mean()) if len(self.classes) else float("nan")

    @property
    def map50_95(self) -> float:
        """Mean over classes and the IoU thresholds (COCO's AP)."""
        return float(self.ap.mean()) if len(self.classes) else float("nan")

    @property
    def mean_precision(self) -> float:
        return float(self.precision.mean()) if len(self.classes) else float("nan")

    @property
    def mean_recall(self) -> float:
        return float(self.recall.mean()) if len(self.classes) else float("nan")

    def summary(self) -> Dict[str, float]:
        """``{"precision", "recall", "mAP50", "mAP50_95"}`` as plain floats."""
        return {
            "precision": self.mean_precision,
            "recall": self.mean_recall,
            "mAP50": self.map50,
            "mAP50_95": self.map50_95,
        }

    def ap50_per_class(self, digits: int = 4) -> Dict[str, float]:
        """``{class id as str: AP at IoU 0.5}`` for the evaluated classes, rounded."""
        return {str(int(c)): round(float(a), digits) for c, a in zip(self.classes, self.ap[:, 0])}


def interpolated_average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """COCO's 101-point interpolated AP of one precision-recall curve.

    Args:
        recall: ``[N]`` non-decreasing recall after each detection (sorted by score).
        precision: ``[N]`` precision after each detection.

    The precision at recall level ``r`` is the highest precision reached at any recall
    ``>= r`` (0 if ``r`` is never reached); AP is its mean over ``r = 0, 0.01, ..., 1``.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if len(recall) == 0:
        return 0.0
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, RECALL_LEVELS, side="left")
    reached = index < len(recall)
    interpolated = np.zeros_like(RECALL_LEVELS)
    interpolated[reached] = envelope[index[reached]]
    return float(interpolated.mean())


def evaluate_matches(stats: MatchStats) -> DetectionMetrics:
    """Per-class AP, precision and recall of the detections in ``stats``.

    Detections are ranked by confidence over the whole set (ties keep their order in
    ``stats``). For precision and recall, a single score threshold is chosen for all
    classes: the one maximising the mean over classes of F1 at IoU 0.5; a class with no
    detection above it has precision 0.
    """
    thresholds = tuple(stats.iou_thresholds)
    if not thresholds or abs(thresholds[0] - 0.5) > 1e-9:
        raise ValueError(f"the first IoU threshold must be 0.5, got {thresholds}")
    classes = np.flatnonzero(stats.gt_counts > 0)
    num_gt = stats.gt_counts[classes]
    ap = np.zeros((len(classes), len(thresholds)))
    # Candidate thresholds for the F1-optimal precision/recall: every distinct score.
    candidates = np.unique(stats.confidence)[::-1]  # decreasing
    precision_at = np.zeros((len(classes), len(candidates)))
    recall_at = np.zeros((len(classes), len(candidates)))
    for row, (cls, n_gt) in enumerate(zip(classes, num_gt)):
        mine = np.flatnonzero(stats.pred_class == cls)
        order = mine[np.argsort(-stats.confidence[mine], kind="stable")]
        if not len(order):
            continue
        hits = stats.true_positive[order]  # [n, T]
        tp_cum = np.cumsum(hits, axis=0)
        ranks = np.arange(1, len(order) + 1)[:, None]
        recall = tp_cum / n_gt
        precision = tp_cum / ranks
        for col in range(len(thresholds)):
            ap[row, col] = interpolated_average_precision(recall[:, col], precision[:, col])
        # Detections of this class scoring >= each candidate threshold.
        count = np.searchsorted(-stats.confidence[order], -candidates, side="right")
        tp_at = np.where(count > 0, tp_cum[np.maximum(count - 1, 0), 0], 0)
        precision_at[row] = np.where(count > 0, tp_at / np.maximum(count, 1), 0.0)
        recall_at[row] = tp_at / n_gt
    if len(classes) and len(candidates):
        denominator = precision_at + recall_at
        f1 = np.where(denominator > 0, 2 * precision_at * recall_at / np.maximum(denominator, 1e-12), 0.0)
        best = int(f1.mean(axis=0).argmax())
        precision, recall = precision_at[:, best], recall_at[:, best]
        confidence_threshold = float(candidates[best])
    else:
        precision = recall = np.zeros(len(classes))
        confidence_threshold = 1.0
    return DetectionMetrics(
        classes=classes.astype(np.int64),
        num_ground_truth=num_gt.astype(np.int64),
        ap=ap,
        precision=precision,
        recall=recall,
        confidence_threshold=confidence_threshold,
        iou_thresholds=thresholds,
    )


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _unb64(text: str, dtype: np.dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype)
