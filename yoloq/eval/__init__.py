"""COCO evaluation: NMS, predictors and the COCOeval pipeline (sharded under torch.distributed)."""
from yoloq.eval.coco_eval import (COCO80_TO_91, STAT_NAMES, CocoScores, EvalResult, category_ids, coco_evaluation,
                                  coco_stats, evaluate, evaluate_model, format_stats_table, save_coco_json,
                                  save_result, scale_boxes, to_coco_detections)
from yoloq.eval.detections import CocoDetections
from yoloq.eval.loop import NmsOutput
from yoloq.eval.nms import batched_detections, non_max_suppression

__all__ = ["COCO80_TO_91", "STAT_NAMES", "CocoDetections", "CocoScores", "EvalResult", "NmsOutput",
           "batched_detections", "category_ids", "coco_evaluation", "coco_stats", "evaluate", "evaluate_model",
           "format_stats_table", "save_coco_json", "save_result", "scale_boxes", "to_coco_detections",
           "non_max_suppression"]
