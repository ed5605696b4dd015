"""What every PTQ bench row is measured against: the FP32 model, loaded as ``yoloq ptq`` loads it,
and the val evaluation plus paired drop interval each row shares (``bench-alpha``, ``bench-robustness``)."""
from __future__ import annotations

from typing import Optional

from yoloq.config import Config, DataConfig
from yoloq.device import resolve_device
from yoloq.eval.coco_eval import EvalResult, evaluate_model
from yoloq.recipes.common import seed_everything
from yoloq.recipes.ptq import drop_interval_record


def ap_drop(reference: EvalResult, candidate: EvalResult, resamples: int) -> dict:
    """AP points lost from ``reference`` to ``candidate`` and, when ``resamples`` > 0, the paired
    bootstrap interval record (``yoloq ptq``'s ``drop_ci``); ``ci`` None otherwise."""
    drop = (reference.stats["AP"] - candidate.stats["AP"]) * 100
    return {"drop": drop, "ci": drop_interval_record(reference, candidate, resamples) if resamples else None}


class FP32Baseline:
    """The seeded FP32 model on ``device`` (seeded first, as ``yoloq ptq`` is, so a row is the run a
    user gets) and the val evaluation every model of the bench goes through."""

    def __init__(self, cfg: Config, data_cfg: DataConfig, *, device: str, max_images: Optional[int],
                 bootstrap: int):
        from yoloq.models import load_model
        self.cfg, self.data_cfg, self.max_images, self.bootstrap = cfg, data_cfg, max_images, bootstrap
        seed_everything(cfg.quant.seed)
        self.fp32 = load_model(cfg.model).to(resolve_device(device))

    def val(self, model) -> EvalResult:
        """COCO evaluation on the val images (the first ``max_images`` when set)."""
        return evaluate_model(model, self.data_cfg, self.cfg.eval, self.cfg.model.img_size,
                              max_images=self.max_images, progress=False)

    def drop(self, reference: EvalResult, candidate: EvalResult) -> dict:
        return ap_drop(reference, candidate, self.bootstrap)
