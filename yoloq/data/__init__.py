"""Datasets: dataset YAMLs (COCO-JSON or upstream YOLO form), letterbox preprocessing, datasets and loaders."""
from yoloq.data.coco import (CocoDetectionDataset, FailedItem, ImageMeta, calibration_images, calibration_loader,
                   letterbox, make_loader, read_image, to_tensor)
from yoloq.data.load import load_data_config

__all__ = ["CocoDetectionDataset", "FailedItem", "ImageMeta", "calibration_images", "calibration_loader",
           "letterbox", "load_data_config", "make_loader", "read_image", "to_tensor"]
