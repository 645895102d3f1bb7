#!/usr/bin/env python
"""Evaluate a run's final YOLOv3 model on one YOLO-format folder, in one process.

    python benchmarks/bench_yolov3_eval.py RUN_DIR TEST_FOLDER [TEST_FOLDER ...]

Loads ``RUN_DIR/final_model.pt`` into the network of the run's ``--model_def`` (read from
``RUN_DIR/summary.json``), evaluates it at the run's ``--img_size`` and test settings on
all the images of the given folders together (each holds ``images/`` and ``labels/``),
and prints precision, recall, mAP@0.5 and mAP@0.5:0.95. For a federated run, passing
every client's test folder gives the single-evaluator metrics of the union of the test
sets, which the server's exact aggregation must reproduce.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedml_api.data.yolo_dataset import YoloDataset, collate_detections  # noqa: E402
from fedml_api.model.YOLOv3 import (  # noqa: E402
    Darknet,
    EvaluationSettings,
    collect_match_stats,
    evaluate_matches,
    resolve_cfg_path,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("test_folders", type=Path, nargs="+")
    options = parser.parse_args()
    config = json.loads((options.run_dir / "summary.json").read_text())["config"]
    model = Darknet(resolve_cfg_path(config["model_def"]))
    model.load_state_dict(torch.load(options.run_dir / "final_model.pt"))
    dataset = ConcatDataset([YoloDataset(folder, config["img_size"]) for folder in options.test_folders])
    loader = DataLoader(dataset, batch_size=config["test_batch_size"], collate_fn=collate_detections)
    settings = EvaluationSettings(config["conf_thres"], config["nms_iou"], config["max_det"])
    stats, loss = collect_match_stats(model, loader, torch.device("cpu"), settings)
    metrics = evaluate_matches(stats)
    summary = {key: round(value, 6) for key, value in metrics.summary().items()}
    print(f"{options.run_dir}: {stats.num_images} images, {int(stats.gt_counts.sum())} objects, "
          f"loss {loss:.4f}, {summary}")


if __name__ == "__main__":
    main()
