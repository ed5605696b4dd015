"""Training: the one training engine (:mod:`yoloq.train.engine`, also QAT's), its detection step,
YOLOv6 v3 losses and assigners, augmentation with labels, RepOpt.

    from yoloq.train import run_train, TrainOptions
    run_train("configs/yolov6n_qarepvgg.yaml", TrainOptions(epochs=300))

Pieces for other steps (e.g. QAT's distillation): :func:`~yoloq.train.engine.fit` with a
:class:`~yoloq.train.engine.Step`, :class:`~yoloq.train.losses.DetectionLoss`,
:class:`~yoloq.train.dataset.AugmentedDataset` + :class:`~yoloq.train.augment.Augmenter`,
:class:`~yoloq.train.repopt.RepOptimizer`.
"""
from yoloq.train.errors import NonFiniteLossError, NonFiniteWeightsError, ScalesMismatchError, TrainError
from yoloq.train.losses import DetectionLoss
from yoloq.train.run import TrainOptions, TrainResult, run_train

__all__ = ["DetectionLoss", "NonFiniteLossError", "NonFiniteWeightsError", "ScalesMismatchError", "TrainError",
           "TrainOptions", "TrainResult", "run_train"]
