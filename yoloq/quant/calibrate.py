"""Post-training calibration of a prepared model: max, percentile, entropy (KL) and MSE.

One pass over the calibration images collects, for every activation quantizer (site), the
running absolute max and a fixed-width histogram of |x| (:class:`RangeHistogram`: bins keep one
width as the range grows, counted exactly with ``bincount``); nothing else of the activations is
kept. The quantizers hand their inputs over in the library's calibration mode
(``yoloq.quant.backend.collecting``). Every method's amax is then computed from those statistics, which stay on the model
(``QuantState.calib``), so ``apply_calibration`` / ``calibrate_auto`` never re-run the data.

Activations are collected in FP32 (all quantizers off). Weights: per-channel max. Entropy and MSE
are vectorised re-implementations of pytorch-quantization's histogram searches (its MSE calls
``.cuda()``; its entropy loops in Python): same candidate amax values (bin edges from bin 128 on
for entropy, bin centres for MSE), same objective, on CPU. Everything is deterministic.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from yoloq.config import AUTO_METHODS, parse_method
from yoloq.device import module_device
from yoloq.errors import InputError, YoloqError
from yoloq.quant.batches import image_batch
from yoloq.quant.metrics import output_error
from yoloq.quant import backend
from yoloq.quant.backend import TensorQuantizer, set_amax
from yoloq.quant.prepare import fix_dead_channels, input_quantizers, quant_layers, set_layers_quantized
from yoloq.quant.scheme import NUM_BITS
from yoloq.quant.state import CalibrationState, quant_state

START_BIN = 128            # pytorch-quantization / TensorRT: smallest candidate clip for entropy & mse
SEARCH_MAX_BINS = 4096     # entropy / mse search on at most this many bins (merged beyond)


class CalibrationError(YoloqError, RuntimeError):
    """Calibration data or statistics are unusable; the message names the quantizer / layer."""


# --------------------------------------------------------------------------- statistics


class RangeHistogram:
    """Histogram of |x| with a fixed bin width (set by the first non-zero batch: max / num_bins).

    Unlike pytorch-quantization's ``HistogramCalibrator`` (``torch.histc``), the bins never change
    width when the range grows (new bins are appended), and counts are exact integers
    (``bincount``, float64 on the CPU). If the range grows past ``8 * num_bins`` bins, adjacent
    bins are merged by an integer factor (counts stay exact). Streamed: nothing of ``x`` is kept.
    """

    def __init__(self, num_bins: int = 2048):
        self.base_bins = num_bins
        self.width: Optional[float] = None
        self.hist: Optional[torch.Tensor] = None
        self.zeros = 0                      # |x| == 0 seen before the width was known

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        x = x.detach().abs().flatten().float()
        x_max = float(x.max()) if x.numel() else 0.0
        if self.width is None:
            if x_max == 0.0:
                self.zeros += x.numel()
                return
            self.width = x_max / self.base_bins
            self.hist = torch.zeros(self.base_bins, dtype=torch.float64)
            self.hist[0] += self.zeros
        need = math.ceil(x_max / self.width)
        if need > 8 * self.base_bins:            # range grew a lot: merge bins before growing
            self._coarsen(math.ceil(need / self.base_bins))
            need = math.ceil(x_max / self.width)
        n = self.hist.numel()
        if need > n:
            self.hist = torch.cat((self.hist, self.hist.new_zeros(need - n)))
            n = need
        idx = (x / self.width).long().clamp_(0, n - 1)
        self.hist += torch.bincount(idx, minlength=n).to(torch.float64).cpu()

    def _coarsen(self, factor: int) -> None:
        hist = self.hist
        pad = (-hist.numel()) % factor
        self.hist = torch.cat((hist, hist.new_zeros(pad))).view(-1, factor).sum(1)
        self.width *= factor


@dataclass
class SiteStats:
    """Calibration statistics of one activation quantizer (plain tensors, CPU)."""
    amax: float                      # running absolute max
    hist: Optional[torch.Tensor]     # float64 counts of |x| per bin; None if only zeros were seen
    width: float                     # bin width
    count: int                       # values collected


class _SiteCollector:
    """Stands in as a quantizer's calibrator (``backend.collecting``): running max + histogram,
    finite check, and each tensor object counted once per batch even when several consumers pass
    it in."""

    def __init__(self, site: str, consumers: Sequence[str], num_bins: int):
        self.site, self.consumers = site, list(consumers)
        self.amax: Optional[float] = None         # running max |x|
        self.hist_cal = RangeHistogram(num_bins)
        self.count = 0
        self.batch = -1
        self._seen: list[weakref.ref] = []

    def new_batch(self, index: int) -> None:
        self.batch, self._seen = index, []

    def collect(self, x: torch.Tensor) -> None:
        if any(ref() is x for ref in self._seen):
            return
        self._seen.append(weakref.ref(x))
        if not torch.isfinite(x).all():
            bad = "NaN" if torch.isnan(x).any() else "inf"
            readers = ", ".join(self.consumers) or self.site
            raise CalibrationError(f"calibration batch {self.batch}: {bad} in the input of {readers} "
                                   f"(quantizer {self.site}); check the images and the FP32 model")
        local = float(x.detach().abs().max()) if x.numel() else 0.0
        self.amax = local if self.amax is None else max(self.amax, local)
        self.hist_cal.collect(x)
        self.count += x.numel()

    def stats(self) -> Optional[SiteStats]:
        if self.amax is None:
            return None
        h = self.hist_cal
        return SiteStats(amax=self.amax, hist=None if h.hist is None else h.hist.clone(), width=h.width or 0.0,
                         count=self.count)


@torch.no_grad()
def collect_statistics(model: nn.Module, batches: Iterable, num_bins: int = 2048, progress: bool = True,
                       keep: int = 0) -> list[torch.Tensor]:
    """Run ``batches`` through the FP32 path of a prepared model and store per-site statistics in
    the model's ``QuantState.calib`` (site name -> SiteStats). Returns the first ``keep`` batches."""
    state = quant_state(model)
    placement = state.placement
    quantizers = input_quantizers(model)
    tensor_qs = {n: q for n, q in quantizers.items() if isinstance(q, TensorQuantizer)}
    collectors = {s.name: _SiteCollector(s.name, s.consumers, num_bins) for s in placement.sites if s.name in tensor_qs}
    weight_qs = [backend.weight_quantizer(m) for m in quant_layers(model).values()]
    skipped = list(state.skip_layers)
    was_training = model.training
    device, kept, seen = module_device(model), [], 0
    model.eval()
    with backend.quiet():
        set_layers_quantized(model, skipped, True)      # every site sees data (all runs in FP32)
        try:
            with backend.collecting(tensor_qs, collectors), backend.fake_quant_off(weight_qs):
                total = len(batches) if hasattr(batches, "__len__") else None
                for i, batch in enumerate(tqdm(batches, total=total, desc="calibrate", disable=not progress)):
                    images = image_batch(batch).to(device)
                    for c in collectors.values():
                        c.new_batch(i)
                    model(images)
                    seen += images.shape[0]
                    if len(kept) < keep:
                        kept.append(images)
        finally:
            set_layers_quantized(model, skipped, False)
            model.train(was_training)
    if seen == 0:
        raise CalibrationError("calibration got no images (empty batches iterable)")
    state.calib = CalibrationState(stats={name: c.stats() for name, c in collectors.items()}, images=seen)
    return kept


# --------------------------------------------------------------------------- amax from a histogram


def amax_percentile(hist: torch.Tensor, width: float, percentile: float) -> float:
    """pytorch-quantization's percentile rule on our histogram: the lower edge of the bin where
    the CDF of |x| reaches ``percentile`` %."""
    if not 0.0 < percentile <= 100.0:
        raise InputError(f"percentile must be in (0, 100], got {percentile}")
    edges = torch.arange(hist.numel() + 1, dtype=torch.float64) * width
    return backend.percentile_amax(hist, edges, percentile)


def amax_mse(hist: torch.Tensor, width: float, num_bits: int = NUM_BITS, start_bin: int = START_BIN,
             chunk: int = 128) -> float:
    """Bin centre minimising the histogram-weighted squared error of symmetric fake quantization
    (narrow range): pytorch-quantization's ``_compute_amax_mse`` objective and candidates (centres
    of bins start_bin .. n-1), on CPU. Bins above the candidate are clipped (error from prefix
    sums); only bins below it need the rounding error, computed in blocks of candidates."""
    h = hist.double()
    n = h.numel()
    centers = (torch.arange(n, dtype=torch.float64) + 0.5) * width
    zero = torch.zeros(1, dtype=torch.float64)
    c0, c1, c2 = (torch.cat((zero, torch.cumsum(h * centers ** p, 0))) for p in (0, 1, 2))
    cands = torch.arange(min(start_bin, n - 1), n)
    bound = 2.0 ** (num_bits - 1) - 1
    errors = []
    for part in torch.split(cands, chunk):
        cols = int(part[-1]) + 1                                          # bins at or below the candidates
        amax = centers[part].unsqueeze(1)                                 # [k, 1]
        c, w = centers[:cols], h[:cols]
        q = torch.clamp(torch.round(c * (bound / amax)), -bound, bound) * (amax / bound)
        inside = torch.arange(cols).unsqueeze(0) <= part.unsqueeze(1)
        round_err = torch.where(inside, (q - c) ** 2 * w, torch.zeros((), dtype=torch.float64)).sum(1)
        a = amax.squeeze(1)                                               # clipped: sum h (c - a)^2 over j > i
        hi = part + 1
        clip_err = (c2[n] - c2[hi]) - 2 * a * (c1[n] - c1[hi]) + a ** 2 * (c0[n] - c0[hi])
        errors.append(round_err + clip_err.clamp(min=0))
    errors = torch.cat(errors)
    best = float(errors.min())
    first = int(torch.nonzero(errors <= best + 1e-12 * max(1.0, abs(best))).flatten()[0])   # as np.argmin
    return float(centers[cands[first]])


def amax_entropy(hist: torch.Tensor, width: float, num_bits: int = NUM_BITS, start_bin: int = START_BIN) -> float:
    """Clip minimising KL(P || Q) as TensorRT / pytorch-quantization's ``_compute_amax_entropy``:
    for each candidate bin i, P = histogram up to bin i with the tail folded into bin i-1, Q = P
    merged into 2**(bits-1) levels (level of bin j: floor(j * levels / i)) and spread evenly over
    each level's non-empty bins; amax = edge i, the last minimum winning.

    Each level is a contiguous run of bins, so every sum comes from prefix sums: O(levels) per
    candidate instead of upstream's Python loops over bins (same objective, same candidates).
    """
    b = hist.double().clone()
    n = b.numel()
    if n > 1:
        b[0] = b[1]                          # as upstream: the zero bin (ReLU) is not informative
    levels = 1 << (num_bits - 1)
    total = float(b.sum())
    if total <= 0 or n < 2:
        return n * width
    zero = torch.zeros(1, dtype=torch.float64)
    cs = torch.cat((zero, torch.cumsum(b, 0)))                            # cs[j] = sum b[:j]
    cnz = torch.cat((zero, torch.cumsum((b > 0).double(), 0)))            # non-empty bins
    blogb = torch.where(b > 0, b * torch.log(b.clamp(min=1e-300)), torch.zeros((), dtype=torch.float64))
    cbl = torch.cat((zero, torch.cumsum(blogb, 0)))

    i = torch.arange(min(start_bin, n), n + 1)                             # candidate stops
    k = torch.arange(levels + 1)
    bounds = torch.div(k.unsqueeze(0) * i.unsqueeze(1) + levels - 1, levels, rounding_mode="floor")  # [I, L+1]
    level_sum = cs[bounds[:, 1:]] - cs[bounds[:, :-1]]                    # S_k   [I, L]
    level_cnt = cnz[bounds[:, 1:]] - cnz[bounds[:, :-1]]                  # N_k
    tail = total - cs[i]                                                  # mass beyond bin i
    last = b[i - 1] + tail                                                # P's last bin (tail folded in)
    clipped = cs[i]                                                       # Q's total before normalising

    # sum_j p log p, with p = b' / total
    p_log_p = (cbl[i - 1] + torch.where(last > 0, last * torch.log(last.clamp(min=1e-300)), 0.0)) / total \
        - math.log(total)
    # sum_j p log q: every non-empty bin of level k has q = S_k / N_k / clipped; the last level
    # also carries the tail mass in P
    weight = level_sum.clone()
    weight[:, -1] += tail
    log_q = torch.log((level_sum / level_cnt.clamp(min=1)).clamp(min=1e-300)) - torch.log(clipped).unsqueeze(1)
    p_log_q = torch.where(weight > 0, weight * log_q, torch.zeros((), dtype=torch.float64)).sum(1) / total
    kl = p_log_p - p_log_q
    kl = torch.where((b[i - 1] == 0) & (tail > 0), torch.full_like(kl, math.inf), kl)   # q = 0 < p there
    best = float(kl.min())
    ties = torch.nonzero(kl <= best + 1e-12 * max(1.0, abs(best))).flatten()           # last minimum wins
    return int(i[int(ties[-1])]) * width


def site_amax(stats: SiteStats, method: str, percentile: float = 99.99) -> float:
    kind, p = parse_method(method, percentile)
    if kind == "max" or stats.hist is None or stats.hist.sum() == 0:
        return stats.amax
    if kind == "percentile":
        return min(amax_percentile(stats.hist, stats.width, p), stats.amax)
    hist, width = _merged(stats.hist, stats.width)
    if kind == "mse":
        return amax_mse(hist, width)
    return min(amax_entropy(hist, width), stats.amax)


def _merged(hist: torch.Tensor, width: float, max_bins: int = SEARCH_MAX_BINS) -> tuple[torch.Tensor, float]:
    """Merge adjacent bins (integer factor) so the entropy / MSE searches stay fast after a
    range that grew far beyond the first batch's."""
    if hist.numel() <= max_bins:
        return hist, width
    factor = math.ceil(hist.numel() / (max_bins // 2))
    pad = (-hist.numel()) % factor
    return torch.cat((hist, hist.new_zeros(pad))).view(-1, factor).sum(1), width * factor


# --------------------------------------------------------------------------- public API


@torch.no_grad()
def calibrate_weights(model: nn.Module) -> None:
    """Per-channel max of every quantized conv weight (skipped layers too: cheap, and ready if
    they are switched back on)."""
    for layer in quant_layers(model).values():
        wq = backend.weight_quantizer(layer)
        set_amax(wq, backend.channel_max(wq, layer.weight))


def method_key(method: str, percentile: float = 99.99) -> str:
    """Canonical name of a method: 'max', 'entropy', 'mse' or 'percentile-<p>'."""
    kind, p = parse_method(method, percentile)
    return f"percentile-{p:g}" if kind == "percentile" else kind


def compute_amaxes(model: nn.Module, method: str = "max", percentile: float = 99.99) -> dict[str, float]:
    """Activation amax per site for ``method`` from the stored statistics (cached per method)."""
    key = method_key(method, percentile)
    calib = quant_state(model).calib
    stats = calib.stats
    if not stats:
        raise CalibrationError("no calibration statistics on this model: run calibrate() first")
    cache = calib.amax_cache
    if key not in cache:
        cache[key] = {name: site_amax(st, key) for name, st in stats.items() if st is not None}
    return dict(cache[key])


def apply_calibration(model: nn.Module, method: str = "max", percentile: float = 99.99) -> dict[str, float]:
    """Set every activation amax from the stored statistics with ``method``; weights per-channel
    max; dead channels fixed. Sites that saw no data get a tiny amax. Returns site name -> amax."""
    amaxes = compute_amaxes(model, method, percentile)
    quantizers = input_quantizers(model)
    device = module_device(model)
    with backend.quiet():
        for name, q in quantizers.items():
            if isinstance(q, TensorQuantizer):
                set_amax(q, torch.tensor(amaxes.get(name, 0.0)), device)
        calibrate_weights(model)
        fix_dead_channels(model)
    quant_state(model).calib.method = method_key(method, percentile)
    return amaxes


def calibrate(model: nn.Module, batches: Iterable, method: str = "max", percentile: float = 99.99,
              num_bins: int = 2048, progress: bool = True) -> None:
    """Calibrate a prepared model in place: one pass over ``batches`` ([B,3,S,S] tensors in 0..1,
    or loader items ``(images, ...)``), then amax by ``method`` ('max', 'percentile' (with
    ``percentile``), 'percentile-<p>', 'entropy', 'mse'). Statistics stay on the model for
    ``apply_calibration(model, other_method)``."""
    parse_method(method, percentile)
    collect_statistics(model, batches, num_bins=num_bins, progress=progress)
    apply_calibration(model, method, percentile)


# --------------------------------------------------------------------------- automatic choice


@torch.no_grad()
def _batched_error(model: nn.Module, images: list[torch.Tensor], references: list[torch.Tensor]) -> dict:
    out = torch.cat([model(x) for x in images])
    return output_error(torch.cat(references), out)


def calibrate_auto(model: nn.Module, batches: Iterable, fp32_model: nn.Module,
                   methods: Sequence[str] = AUTO_METHODS, num_bins: int = 2048, score_batches: int = 4,
                   progress: bool = True) -> dict:
    """Collect statistics once, then pick the method whose quantized detector output is closest to
    ``fp32_model``'s on the first ``score_batches`` calibration batches (``output_error``; never
    validation mAP). The model is left calibrated with the winner.

    Returns ``{"method", "metric", "images", "errors": {method: {"sqnr_db", ...}}}``.
    """
    if not methods:
        raise InputError("calibrate_auto: no methods given")
    for m in methods:
        parse_method(m)
    kept = collect_statistics(model, batches, num_bins=num_bins, progress=progress, keep=score_batches)
    fp32_model.eval()
    with torch.no_grad():
        refs = [fp32_model(x) for x in kept]
    errors = {}
    for m in tqdm(methods, desc="calibrate auto", disable=not progress):
        apply_calibration(model, m)
        errors[m] = _batched_error(model, kept, refs)
    best = max(methods, key=lambda m: errors[m]["sqnr_db"])    # first of equals wins (stable order)
    if best != methods[-1]:         # the last one is still applied (mse, the slowest, comes last)
        apply_calibration(model, best)
    return {"method": best, "errors": errors, "images": sum(x.shape[0] for x in kept),
            "metric": "detector output SQNR vs FP32 (dB, higher is better) on calibration images"}
