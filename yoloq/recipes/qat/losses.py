"""QAT distillation losses: channel-wise distillation on the neck, KL + box L1 on the head.

Every term is a per-image mean, so DDP's gradient averaging equals one big batch:
- CWD (channel-wise distillation) on each neck output: per channel, a softmax over the H*W
  positions of teacher and student features at temperature T, KL(teacher || student) * T^2,
  averaged over channels and images, summed over levels (``distill_weight``);
- head: per anchor and class the Bernoulli KL between teacher and student sigmoid scores (summed
  over classes, mean over anchors), plus an L1 on the ltrb box distances weighted by the
  teacher's confidence (max class score), normalised per image (``head_weight``);
- PACT: ``alpha_decay * sum(alpha^2)`` (``pact_alpha_l2``).
Neck and head outputs are captured with forward hooks on ``model.neck`` / ``model.detect``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from yoloq.config import QATConfig
from yoloq.recipes.qat import QATError
from yoloq.quant.learnable import pact_alpha_l2


def cwd_loss(student: list, teacher: list, temperature: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation summed over feature levels: mean over (image, channel) of
    KL(softmax_HW(t / T) || softmax_HW(s / T)) * T^2."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher):
        s = s.flatten(2) / temperature
        t = t.detach().flatten(2) / temperature
        kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
        total = total + kl.mean() * temperature ** 2
    return total

def _flatten_head(outputs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """[(cls [B,nc,H,W], ltrb [B,4,H,W]) per level] -> cls [B,nc,N], ltrb [B,4,N]."""
    cls = torch.cat([c.flatten(2) for c, _ in outputs], 2)
    box = torch.cat([b.flatten(2) for _, b in outputs], 2)
    return cls, box

def head_loss(student: list, teacher: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(class term, box term): Bernoulli KL of the sigmoid scores (sum over classes, mean over
    anchors and images) and teacher-confidence-weighted L1 on ltrb (per image normalised)."""
    s_cls, s_box = _flatten_head(student)
    t_cls, t_box = _flatten_head(teacher)
    t_cls, t_box = t_cls.detach(), t_box.detach()
    p = torch.sigmoid(t_cls)
    # BCE(student logits, teacher probs) - H(teacher) = KL(Bernoulli(p_t) || Bernoulli(p_s)) >= 0
    kl = F.binary_cross_entropy_with_logits(s_cls, p, reduction="none") \
        - F.binary_cross_entropy_with_logits(t_cls, p, reduction="none")
    cls_term = kl.sum(1).mean()
    w = p.max(1).values                                            # [B, N]
    l1 = (s_box - t_box).abs().sum(1)                              # [B, N]
    box_term = ((w * l1).sum(1) / w.sum(1).clamp_min(1e-6)).mean()
    return cls_term, box_term

class FeatureTap:
    """Forward hooks keeping the latest outputs of ``model.neck`` and ``model.detect``."""

    def __init__(self, model: nn.Module):
        for name in ("neck", "detect"):
            if not isinstance(getattr(model, name, None), nn.Module):
                raise QATError(f"QAT distillation needs model.{name} (the neck / head modules); "
                               f"{type(model).__name__} has none")
        self.out: dict[str, object] = {}
        self.handles = [model.neck.register_forward_hook(self._keep("neck")),
                        model.detect.register_forward_hook(self._keep("detect"))]

    def _keep(self, key: str):
        def hook(module, args, output):
            self.out[key] = output
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

def distill_loss(s_tap: FeatureTap, t_tap: FeatureTap, qcfg: QATConfig, student: nn.Module) -> dict:
    neck_s, neck_t = list(s_tap.out["neck"]), list(t_tap.out["neck"])
    terms = {"cwd": cwd_loss(neck_s, neck_t, qcfg.temperature)}
    terms["cls"], terms["box"] = head_loss(s_tap.out["detect"], t_tap.out["detect"])
    terms["alpha_l2"] = pact_alpha_l2(student).to(terms["cwd"].device)
    terms["loss"] = (qcfg.distill_weight * terms["cwd"] + qcfg.head_weight * (terms["cls"] + terms["box"])
                     + qcfg.alpha_decay * terms["alpha_l2"])
    return terms
