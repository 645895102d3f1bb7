"""How the server combines the clients' YOLOv3Trainer.test() results."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Dict, Mapping, Sequence

from fedml_api.model.YOLOv3.metrics import MatchStats, evaluate_matches
from fedml_core.trainer.result_aggregator import ResultAggregator

#: Scalar metrics of a client's result that the aggregator averages.
SCALAR_METRICS = ("precision", "recall", "mAP50", "mAP50_95", "loss")


class YOLOv3ResultAggregator(ResultAggregator):
    """Global detection metrics of a test round: exact on the union of the test sets.

    **Why not simply the weighted mean of the clients' mAP?** A client's mAP is not a
    mean over its images, so weighting it by the number of images does not give the mAP
    of all images together:

    * AP ranks *all* detections of a class by confidence and measures the area under the
      precision-recall curve of that ranking. Pooled, one client's detections interleave
      with the others': high-confidence false positives that only client A's images
      provoke lower the precision at which client B's true positives are found, which
      neither client's own curve shows (and the reverse raises it). Precision and
      recall at a confidence threshold are likewise per-class ratios of pooled counts.
    * mAP is the mean over the classes *present in the evaluated set*. A class with a few
      objects, all on one client, weighs ``1 / K_a`` in that client's mAP (``K_a`` its
      number of classes), nothing in the others', and ``1 / K`` in the union's; image
      counts do not carry that weighting.

    The two can differ in either direction (tests/test_yolo_metrics.py has a case).

    **What is computed instead.** Clients send their :class:`MatchStats` (per detection:
    confidence, class, true-positive flag at each IoU threshold; per class: the number of
    ground-truth objects) as ``result["match_stats"]``. Matching is done image by image,
    so these statistics do not depend on how the images are spread over clients:
    concatenated, they are exactly the statistics of the union, and evaluating them gives
    the precision, recall, mAP@0.5 and mAP@0.5:0.95 a single evaluator would report on all
    clients' test images. They cost about 11 bytes per detection (at most ``max_det`` per
    image), so this is the default; a client run with ``--no_match_stats`` sends only
    scalars, and if any client did, the weighted means are reported instead.

    The returned dict holds scalars (logged, plotted and stored in ``metrics.jsonl``) and
    one small dict; the raw statistics are not kept:

    * ``precision``, ``recall``, ``mAP50``, ``mAP50_95``: of the union (exact) or, without
      statistics from every client, the sample-weighted means;
    * ``exact_union``: which of the two;
    * ``client_mean_mAP50``, ``client_mean_mAP50_95``: the sample-weighted means of the
      clients' own values, for comparison;
    * ``loss``: sample-weighted mean of the clients' mean test loss;
    * ``num_ground_truth``: objects in all test sets (with statistics);
    * ``AP50_per_class``: ``{class id: AP@0.5}`` over the union (with statistics);
    * ``sample_number``: total test images.

    Client metrics that are NaN (a test set without objects has no mAP) are left out of
    the weighted means.
    """

    def aggregate_result(self, result_dict: Mapping[int, Mapping[str, Any]]) -> Dict[str, Any]:
        entries = [result_dict[idx] for idx in sorted(result_dict)]
        if not entries:
            raise ValueError("aggregate_result needs at least one client's result")
        means = _weighted_means(entries, SCALAR_METRICS)
        all_stats = [entry["result"].get("match_stats") for entry in entries]
        exact = all(stats is not None for stats in all_stats)
        combined: Dict[str, Any] = {}
        if exact:
            union = MatchStats.concatenate([MatchStats.from_json(stats) for stats in all_stats])
            metrics = evaluate_matches(union)
            combined.update(metrics.summary())
        else:
            combined.update({name: means[name] for name in ("precision", "recall", "mAP50", "mAP50_95")})
        combined["exact_union"] = exact
        combined["client_mean_mAP50"] = means["mAP50"]
        combined["client_mean_mAP50_95"] = means["mAP50_95"]
        combined["loss"] = means["loss"]
        if exact:
            combined["num_ground_truth"] = int(union.gt_counts.sum())
            combined["AP50_per_class"] = metrics.ap50_per_class()
        combined["sample_number"] = sum(int(entry["sample_number"]) for entry in entries)
        return combined


def _weighted_means(entries: Sequence[Mapping[str, Any]], names: Sequence[str]) -> Dict[str, float]:
    """Sample-weighted mean of each named metric over the clients that report a finite value
    (NaN when none does)."""
    means = {}
    for name in names:
        total = weight = 0.0
        for entry in entries:
            value = entry["result"].get(name)
            if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value):
                total += float(value) * int(entry["sample_number"])
                weight += int(entry["sample_number"])
        means[name] = total / weight if weight else float("nan")
    return means
