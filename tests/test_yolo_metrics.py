"""Detection metrics: matching, COCO 101-point AP, precision/recall, and the server's
aggregation of the clients' results (exact union vs weighted mean)."""

import json
import math

import numpy as np
import pytest
import torch

from fedml_api.model.YOLOv3 import (
    COCO_IOU_THRESHOLDS,
    MatchStats,
    YOLOv3ResultAggregator,
    evaluate_matches,
    interpolated_average_precision,
    match_detections,
)

NUM_CLASSES = 3


def image_stats(dets, gts, num_classes=NUM_CLASSES):
    """MatchStats of one image. dets: [(x1, y1, x2, y2, score, class)], gts: [(x1, y1, x2, y2, class)]."""
    d = torch.tensor(dets, dtype=torch.float32).reshape(-1, 6)
    g = torch.tensor(gts, dtype=torch.float32).reshape(-1, 5)
    hits = match_detections(d[:, :4], d[:, 4], d[:, 5].long(), g[:, :4], g[:, 4].long())
    return MatchStats(
        confidence=d[:, 4].numpy(),
        pred_class=d[:, 5].long().numpy(),
        true_positive=hits,
        gt_counts=np.bincount(g[:, 4].long().numpy(), minlength=num_classes),
        num_images=1,
    )


def client_result(stats: MatchStats, num_images: int) -> dict:
    metrics = evaluate_matches(stats)
    result = dict(metrics.summary(), loss=0.5, match_stats=stats.to_json())
    json.dumps(result)  # what the client sends must be JSON-serialisable
    return {"result": result, "sample_number": num_images}


def test_perfect_detections_give_one_everywhere():
    images = [
        image_stats([(0, 0, 10, 10, 0.9, 0), (20, 20, 40, 50, 0.8, 1)], [(0, 0, 10, 10, 0), (20, 20, 40, 50, 1)]),
        image_stats([(5, 5, 15, 25, 0.7, 2)], [(5, 5, 15, 25, 2)]),
    ]
    metrics = evaluate_matches(MatchStats.concatenate(images))
    assert metrics.summary() == {"precision": 1.0, "recall": 1.0, "mAP50": 1.0, "mAP50_95": 1.0}
    assert list(metrics.classes) == [0, 1, 2] and metrics.ap.shape == (3, 10)


def test_a_known_precision_recall_curve_gives_its_101_point_ap():
    # 3 objects; ranked detections TP, FP, TP, FP: recall 1/3, 1/3, 2/3, 2/3 and precision
    # 1, 1/2, 2/3, 1/2. Interpolated precision: 1 for r <= 1/3 (34 of the 101 recall
    # levels 0, 0.01, ..., 0.33), 2/3 for 1/3 < r <= 2/3 (33 levels), 0 above (34 levels).
    expected = (34 * 1.0 + 33 * 2 / 3) / 101
    recall = np.array([1, 1, 2, 2]) / 3
    precision = np.array([1, 1 / 2, 2 / 3, 1 / 2])
    assert interpolated_average_precision(recall, precision) == pytest.approx(expected, abs=1e-12)

    # The same curve from boxes: three objects, two found, two false positives.
    gts = [(0, 0, 10, 10, 0), (20, 0, 30, 10, 0), (40, 0, 50, 10, 0)]
    dets = [(0, 0, 10, 10, 0.9, 0), (60, 60, 70, 70, 0.8, 0), (20, 0, 30, 10, 0.7, 0), (80, 80, 90, 90, 0.6, 0)]
    metrics = evaluate_matches(image_stats(dets, gts))
    assert metrics.map50 == pytest.approx(expected, abs=1e-12)
    assert metrics.map50_95 == pytest.approx(expected, abs=1e-12)  # exact boxes: same at every IoU
    # Best F1 is at the top 3 detections (P 2/3, R 2/3) or the top one (P 1, R 1/3): F1 2/3 vs 1/2.
    assert (metrics.mean_precision, metrics.mean_recall) == pytest.approx((2 / 3, 2 / 3))
    assert metrics.confidence_threshold == pytest.approx(0.7)


def test_a_detection_is_a_true_positive_up_to_its_iou_and_only_once():
    gts = [(0, 0, 10, 10, 0)]
    # IoU 0.7 exactly: a hit at thresholds 0.50..0.70, a miss at 0.75..0.95.
    hits = image_stats([(0, 0, 10, 7, 0.9, 0)], gts).true_positive
    assert hits.tolist() == [[t <= 0.7 for t in COCO_IOU_THRESHOLDS]]
    # A duplicate of a matched detection is a false positive; so is the wrong class.
    hits = image_stats([(0, 0, 10, 10, 0.9, 0), (0, 0, 10, 10, 0.8, 0), (0, 0, 10, 10, 0.95, 1)], gts).true_positive
    assert hits[:, 0].tolist() == [True, False, False]


def test_matching_is_greedy_by_score_like_pycocotools():
    # Two objects; the higher-scoring detection overlaps both and takes the better one (B),
    # leaving A for the second detection, which overlaps A enough.
    gts = [(0, 0, 10, 10, 0), (4, 0, 14, 10, 0)]  # A, B
    dets = [(3, 0, 13, 10, 0.9, 0), (0, 0, 9, 10, 0.5, 0)]
    hits = image_stats(dets, gts).true_positive
    assert hits[:, 0].tolist() == [True, True]


def test_no_ground_truth_gives_nan_and_no_detections_give_zero():
    empty = evaluate_matches(image_stats([(0, 0, 5, 5, 0.9, 0)], []))
    assert math.isnan(empty.map50) and math.isnan(empty.mean_precision)
    missed = evaluate_matches(image_stats([], [(0, 0, 5, 5, 1)]))
    assert missed.summary() == {"precision": 0.0, "recall": 0.0, "mAP50": 0.0, "mAP50_95": 0.0}


def test_match_stats_json_round_trip_is_bit_exact_and_compact():
    rng = np.random.default_rng(0)
    n = 1000
    stats = MatchStats(
        confidence=rng.random(n, dtype=np.float32),
        pred_class=rng.integers(0, 80, n),
        true_positive=rng.random((n, 10)) < 0.3,
        gt_counts=rng.integers(0, 20, 80),
        num_images=37,
    )
    data = json.loads(json.dumps(stats.to_json()))
    back = MatchStats.from_json(data)
    assert back.confidence.tobytes() == stats.confidence.tobytes()
    assert np.array_equal(back.pred_class, stats.pred_class)
    assert np.array_equal(back.true_positive, stats.true_positive)
    assert np.array_equal(back.gt_counts, stats.gt_counts) and back.num_images == 37
    assert len(json.dumps(data)) < 12 * n + 1000
    empty = MatchStats.empty(80)
    assert MatchStats.from_json(json.loads(json.dumps(empty.to_json()))).true_positive.shape == (0, 10)
    with pytest.raises(ValueError, match="format"):
        MatchStats.from_json({"precision": 1.0})


def test_union_map_differs_from_the_weighted_mean_and_the_aggregator_computes_the_union():
    # Client A: one object, found at score 0.6 -> AP 1. Client B: one object, a false
    # positive at 0.9 ranked above the hit at 0.3 -> AP 1/2. Weighted mean: 3/4. Pooled,
    # B's false positive also outranks A's hit: FP, TP, TP -> precision envelope 2/3
    # over all recall levels -> union AP 2/3.
    a = image_stats([(0, 0, 10, 10, 0.6, 0)], [(0, 0, 10, 10, 0)])
    b = image_stats([(50, 50, 60, 60, 0.9, 0), (0, 0, 10, 10, 0.3, 0)], [(0, 0, 10, 10, 0)])
    assert evaluate_matches(a).map50 == 1.0 and evaluate_matches(b).map50 == 0.5
    combined = YOLOv3ResultAggregator().aggregate_result({0: client_result(a, 1), 1: client_result(b, 1)})
    assert combined["exact_union"] is True
    assert combined["mAP50"] == pytest.approx(2 / 3)
    assert combined["client_mean_mAP50"] == pytest.approx(3 / 4)
    assert combined["sample_number"] == 2 and combined["num_ground_truth"] == 2
    assert combined["AP50_per_class"] == {"0": round(2 / 3, 4)}
    json.dumps(combined)
    assert "match_stats" not in json.dumps(combined)


def test_the_union_of_client_statistics_equals_evaluating_all_images_at_once():
    rng = np.random.default_rng(1)
    images = []
    for _ in range(12):
        gts = [(*_box(rng), int(rng.integers(NUM_CLASSES))) for _ in range(rng.integers(1, 5))]
        dets = [(*_jitter(g[:4], rng), float(rng.random()), g[4]) for g in gts if rng.random() < 0.8]
        dets += [(*_box(rng), float(rng.random()), int(rng.integers(NUM_CLASSES))) for _ in range(rng.integers(0, 4))]
        images.append(image_stats(dets, gts))
    everything = evaluate_matches(MatchStats.concatenate(images))
    clients = [MatchStats.concatenate(images[:5]), MatchStats.concatenate(images[5:])]
    combined = YOLOv3ResultAggregator().aggregate_result(
        {i: client_result(s, s.num_images) for i, s in enumerate(clients)}
    )
    for key, value in everything.summary().items():
        assert combined[key] == pytest.approx(value, abs=1e-12), key


def test_without_statistics_from_every_client_the_weighted_means_are_reported():
    results = {
        0: {"result": {"precision": 0.5, "recall": 0.4, "mAP50": 0.3, "mAP50_95": 0.1, "loss": 1.0}, "sample_number": 30},
        1: {"result": {"precision": 0.7, "recall": 0.2, "mAP50": 0.6, "mAP50_95": 0.4, "loss": 2.0}, "sample_number": 10},
        # A client whose test set has no objects: NaN metrics are left out of the means.
        2: {"result": {"precision": float("nan"), "recall": float("nan"), "mAP50": float("nan"),
                       "mAP50_95": float("nan"), "loss": 3.0}, "sample_number": 10},
    }
    combined = YOLOv3ResultAggregator().aggregate_result(results)
    assert combined["exact_union"] is False
    assert combined["mAP50"] == pytest.approx((0.3 * 30 + 0.6 * 10) / 40)
    assert combined["precision"] == pytest.approx((0.5 * 30 + 0.7 * 10) / 40)
    assert combined["loss"] == pytest.approx((30 + 20 + 30) / 50)
    assert combined["sample_number"] == 50


def _box(rng):
    x, y = rng.uniform(0, 80, 2)
    w, h = rng.uniform(5, 30, 2)
    return (float(x), float(y), float(x + w), float(y + h))


def _jitter(box, rng):
    return tuple(float(v + rng.normal(0, 1.5)) for v in box)
