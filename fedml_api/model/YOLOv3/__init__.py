"""YOLOv3 for federated object detection: Darknet model from a .cfg, loss, NMS, metrics,
Darknet weights, trainer, result aggregator and arguments."""

from fedml_api.model.YOLOv3.args import DEFAULT_MODEL_DEF, add_yolov3_args, check_yolov3_args
from fedml_api.model.YOLOv3.cfg import CFG_DIR, parse_cfg, resolve_cfg_path
from fedml_api.model.YOLOv3.darknet import Darknet, YOLOLayer
from fedml_api.model.YOLOv3.evaluation import EvaluationSettings, collect_match_stats
from fedml_api.model.YOLOv3.loss import YoloLossConfig, yolo_loss
from fedml_api.model.YOLOv3.metrics import (
    COCO_IOU_THRESHOLDS,
    DetectionMetrics,
    MatchStats,
    evaluate_matches,
    interpolated_average_precision,
    match_detections,
)
from fedml_api.model.YOLOv3.model import create_model
from fedml_api.model.YOLOv3.postprocess import non_max_suppression
from fedml_api.model.YOLOv3.weights import (
    darknet_weight_count,
    load_darknet_weights,
    save_darknet_weights,
)
from fedml_api.model.YOLOv3.YOLOv3ResultAggregator import YOLOv3ResultAggregator
from fedml_api.model.YOLOv3.YOLOv3Trainer import YOLOv3Trainer

__all__ = [
    "CFG_DIR",
    "COCO_IOU_THRESHOLDS",
    "DEFAULT_MODEL_DEF",
    "Darknet",
    "DetectionMetrics",
    "EvaluationSettings",
    "MatchStats",
    "YOLOLayer",
    "YOLOv3ResultAggregator",
    "YOLOv3Trainer",
    "YoloLossConfig",
    "add_yolov3_args",
    "check_yolov3_args",
    "collect_match_stats",
    "create_model",
    "darknet_weight_count",
    "evaluate_matches",
    "interpolated_average_precision",
    "load_darknet_weights",
    "match_detections",
    "non_max_suppression",
    "parse_cfg",
    "resolve_cfg_path",
    "save_darknet_weights",
    "yolo_loss",
]
