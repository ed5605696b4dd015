"""COCO evaluation: NMS, predictors and the COCOeval pipeline."""
from yoloq.eval.coco_eval import (COCO80_TO_91, STAT_NAMES, EvalResult, category_ids, coco_stats, evaluate,
                        evaluate_model, format_stats_table, save_result, scale_boxes, to_coco_detections)
from yoloq.eval.nms import non_max_suppression

__all__ = ["COCO80_TO_91", "STAT_NAMES", "EvalResult", "category_ids", "coco_stats", "evaluate",
           "evaluate_model", "format_stats_table", "save_result", "scale_boxes", "to_coco_detections",
           "non_max_suppression"]
