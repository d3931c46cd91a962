"""R-CNN detection on VOC07 (paper Tables 2, 3, 5, 8): region features, hard-negative mining,
NMS and the devkit's detection AP. See ``pipeline`` for the flow."""

from cnnft.detection.evaluation import detection_average_precision, match_detections, top_k_nms
from cnnft.detection.mining import MiningConfig, MiningStats, mine_detectors
from cnnft.detection.pipeline import DetectionSettings, run_detection
from cnnft.detection.regions import Regions, RegionStore, clip_to_image, layer_transform, make_regions

__all__ = [
    "DetectionSettings", "MiningConfig", "MiningStats", "RegionStore", "Regions",
    "clip_to_image", "detection_average_precision", "layer_transform", "make_regions",
    "match_detections", "mine_detectors", "run_detection", "top_k_nms",
]
