"""COCO-format data: letterbox preprocessing, datasets and loaders."""
from yoloq.data.coco import (CocoDetectionDataset, FailedItem, ImageMeta, calibration_images, calibration_loader,
                   letterbox, make_loader, read_image, to_tensor)

__all__ = ["CocoDetectionDataset", "FailedItem", "ImageMeta", "calibration_images", "calibration_loader",
           "letterbox", "make_loader", "read_image", "to_tensor"]
