"""Training engine: YOLOv6 v3 losses and assigners, augmentation with labels, the trainer, RepOpt.

    from yoloq.train import run_train, TrainOptions
    run_train("configs/yolov6n_qarepvgg.yaml", TrainOptions(epochs=300))

Pieces for other loops (e.g. labelled QAT): :class:`~yoloq.train.losses.DetectionLoss`,
:class:`~yoloq.train.dataset.AugmentedDataset` + :class:`~yoloq.train.augment.Augmenter`,
:class:`~yoloq.report.run_log.RunLogger`, :class:`~yoloq.train.repopt.RepOptimizer`.
"""
from yoloq.train.errors import NonFiniteLossError, ScalesMismatchError, TrainError
from yoloq.train.losses import DetectionLoss
from yoloq.train.run import TrainOptions, TrainResult, run_train

__all__ = ["DetectionLoss", "NonFiniteLossError", "ScalesMismatchError", "TrainError", "TrainOptions",
           "TrainResult", "run_train"]
