"""The noise of a COCO mAP difference: a paired bootstrap over images.

A drop of 0.3 AP on 500 images means little unless we know how much it moves when other images are
drawn. The paired bootstrap resamples the *images* (with replacement) and scores both models on the
same resampled set each time, so the interval is that of the difference, not of each AP alone (the
two APs are strongly correlated; their difference is much less noisy than either).

COCOeval matches every detection once (pycocotools' ``evaluate``); a resample only reweights images,
so it is scored by re-running COCO's accumulation with per-image weights instead of re-matching:
cumulative true/false positives are weighted sums, the number of ground-truth boxes a weighted count,
and precision is interpolated at COCO's 101 recall points exactly as ``COCOeval.accumulate`` does.
With every weight 1 this reproduces pycocotools' AP to rounding (a test holds it to that).

Speed: the resamples are scored in batches (:meth:`MatchTable.ap_batch`). Scores never change
between resamples, only image weights do, so each category keeps COCO's score order from the one
match, and only its true-positive columns are evaluated: a false-positive or ignored column never
raises the precision envelope nor reaches a new recall point, so it only counts through the
cumulative weight in front of the next true positive. With integer weights (bootstrap counts)
every cumulative count is an exact float, and the recall points are compared exactly as COCO
does (first recall >= point), so the batched AP equals :meth:`MatchTable.ap` to summation rounding.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
_CHUNK = 100                   # resamples scored at once (memory: CHUNK x detections of a category)


@dataclass
class _Category:
    """One category's detections in COCO's global score order, matched once."""
    image_index: np.ndarray     # [D] index of each detection's image in the image list
    true_pos: np.ndarray        # [T, D] matched and not ignored, per IoU threshold
    false_pos: np.ndarray       # [T, D] unmatched and not ignored
    gt_per_image: np.ndarray    # [I] non-ignored ground-truth boxes per image

    def __post_init__(self):
        # What ap_batch reads, per IoU threshold: the true-positive and the ignored columns, and for
        # each true positive how many ignored columns precede it; over all thresholds the columns
        # whose running weight is needed ("needed", a sorted union) and where each threshold's
        # true positives / ignored columns sit among them.
        ignored = ~self.true_pos & ~self.false_pos
        self.tp_cols = [np.flatnonzero(row) for row in self.true_pos]
        self.ignored_cols = [np.flatnonzero(row) for row in ignored]
        self.ignored_before = [np.searchsorted(ign, tp) for ign, tp in zip(self.ignored_cols, self.tp_cols)]
        self.needed = np.unique(np.concatenate([np.zeros(0, int)] + self.tp_cols))
        self.tp_in_needed = [np.searchsorted(self.needed, tp) for tp in self.tp_cols]


@dataclass
class MatchTable:
    """Everything needed to score AP@[.5:.95] (area all, 100 detections) under image weights."""
    image_ids: list
    categories: list            # of _Category (only those with ground truth somewhere)
    recall_points: np.ndarray   # COCO's 101 recall thresholds
    iou_thresholds: np.ndarray

    def ap(self, weights: Optional[np.ndarray] = None, iou_index: Optional[int] = None) -> float:
        """AP (fraction, as COCO's stats) with per-image ``weights`` (default 1 each); ``iou_index``
        restricts it to one IoU threshold (0 = AP50)."""
        w = np.ones(len(self.image_ids)) if weights is None else np.asarray(weights, dtype=np.float64)
        per_category = [v for v in (_category_ap(c, w, self.recall_points, iou_index)
                                    for c in self.categories) if v is not None]
        return float(np.mean(per_category)) if per_category else -1.0

    def ap_batch(self, weights: np.ndarray) -> np.ndarray:
        """AP (fraction) at every IoU threshold for each row of per-image ``weights`` [B, I]: what
        :meth:`ap` gives row by row (to summation rounding for integer weights), B rows at once."""
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        total, counted = np.zeros(len(w)), np.zeros(len(w))
        for cat in self.categories:
            value, has_gt = _category_ap_batch(cat, w, self.recall_points)
            total += np.where(has_gt, value, 0.0)
            counted += has_gt
        return np.where(counted > 0, total / np.maximum(counted, 1), -1.0)


def _category_ap(cat: _Category, w: np.ndarray, recall_points: np.ndarray,
                 iou_index: Optional[int]) -> Optional[float]:
    n_gt = float(np.dot(w, cat.gt_per_image))
    if n_gt == 0:
        return None                                     # COCO leaves such a category out (-1)
    tp, fp = cat.true_pos, cat.false_pos
    if iou_index is not None:
        tp, fp = tp[iou_index:iou_index + 1], fp[iou_index:iou_index + 1]
    if tp.shape[1] == 0:
        return 0.0
    wd = w[cat.image_index]
    tp_sum = np.cumsum(tp * wd, axis=1)
    fp_sum = np.cumsum(fp * wd, axis=1)
    recall = tp_sum / n_gt
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    # COCO: precision made non-increasing from the right, read at the first recall >= each point
    precision = np.flip(np.maximum.accumulate(np.flip(precision, 1), axis=1), 1)
    total = 0.0
    for rc, pr in zip(recall, precision):
        idx = np.searchsorted(rc, recall_points, side="left")
        total += pr[idx[idx < len(pr)]].sum()            # points beyond the last recall count 0
    return total / (len(recall) * len(recall_points))


def _category_ap_batch(cat: _Category, w: np.ndarray, recall_points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_category_ap` over all IoU thresholds for each weight row: (AP [B], has ground truth [B]).
    Arrays are [columns, B] (contiguous over resamples)."""
    n_gt = w @ cat.gt_per_image
    has_gt = n_gt > 0
    total = np.zeros(len(w))
    if not len(cat.needed):
        return total, has_gt
    n_gt = np.where(has_gt, n_gt, 1.0)
    per_image = np.ascontiguousarray(w.T)                                # [I, B]
    # running weight of all columns (true, false positive or ignored) at each needed column: block
    # sums between needed columns, accumulated (integer weights: exact)
    starts = np.concatenate([[0], cat.needed[:-1] + 1])
    seen = np.cumsum(np.add.reduceat(per_image[cat.image_index[:cat.needed[-1] + 1]], starts, axis=0), axis=0)
    for tp, ign, ign_before, at in zip(cat.tp_cols, cat.ignored_cols, cat.ignored_before, cat.tp_in_needed):
        if not len(tp):
            continue
        tp_sum = np.cumsum(per_image[cat.image_index[tp]], axis=0)
        counted = seen[at]                                               # = tp_sum + fp_sum + ignored so far
        if len(ign):
            ign_sum = np.cumsum(per_image[cat.image_index[ign]], axis=0)
            counted = counted - np.concatenate([np.zeros((1, len(w))), ign_sum])[ign_before]
        recall = tp_sum / n_gt
        precision = tp_sum / (counted + np.spacing(1))
        envelope = np.maximum.accumulate(precision[::-1], axis=0)[::-1]
        # recall points newly reached at each true positive (point <= recall, as COCO's searchsorted)
        reached = np.searchsorted(recall_points, recall, side="right")
        total += (envelope * np.diff(reached, axis=0, prepend=0)).sum(axis=0)
    return total / (len(cat.true_pos) * len(recall_points)), has_gt


def match_table(ann_file: str, detections: list, image_ids: Sequence[int]) -> MatchTable:
    """Match ``detections`` (COCO results format) against ``ann_file`` on ``image_ids`` with
    pycocotools (bbox, upstream's parameters) and keep what AP needs per category."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    image_ids = sorted(int(i) for i in image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        wanted = set(image_ids)
        kept = [d for d in detections if int(d["image_id"]) in wanted]
        evaluator = COCOeval(gt, gt.loadRes(kept) if kept else _no_detections(gt), "bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
    return table_from_evaluator(evaluator)


def table_from_evaluator(evaluator) -> MatchTable:
    """The :class:`MatchTable` of a pycocotools ``COCOeval`` (bbox) after ``evaluate()``: what
    ``yoloq.eval.coco_eval`` keeps of each evaluation, so a bootstrap needs no second matching."""
    p = evaluator.params
    n_img, n_area, max_det = len(p.imgIds), len(p.areaRng), p.maxDets[-1]
    categories = []
    for k in range(len(p.catIds)):
        entries = [(i, evaluator.evalImgs[k * n_area * n_img + i]) for i in range(n_img)]   # area 'all'
        cat = _category(entries, n_img, len(p.iouThrs), max_det)
        if cat is not None:
            categories.append(cat)
    return MatchTable(image_ids=sorted(int(i) for i in p.imgIds), categories=categories, recall_points=np.asarray(p.recThrs),
                      iou_thresholds=np.asarray(p.iouThrs))


def _no_detections(gt):
    """An empty results set (pycocotools' loadRes refuses an empty list)."""
    from pycocotools.coco import COCO
    empty = COCO()
    empty.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
    empty.createIndex()
    return empty


def _category(entries: list, n_img: int, n_iou: int, max_det: int) -> Optional[_Category]:
    entries = [(i, e) for i, e in entries if e is not None]
    gt_per_image = np.zeros(n_img)
    for i, e in entries:
        gt_per_image[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
    if gt_per_image.sum() == 0:
        return None
    if not entries:
        empty = np.zeros((n_iou, 0), bool)
        return _Category(np.zeros(0, int), empty, empty, gt_per_image)
    scores = np.concatenate([np.asarray(e["dtScores"][:max_det]) for _, e in entries])
    image_index = np.concatenate([np.full(len(e["dtScores"][:max_det]), i) for i, e in entries]).astype(int)
    matches = np.concatenate([e["dtMatches"][:, :max_det] for _, e in entries], axis=1)
    ignored = np.concatenate([e["dtIgnore"][:, :max_det] for _, e in entries], axis=1).astype(bool)
    order = np.argsort(-scores, kind="mergesort")       # COCO's order, ties in image order
    matched, ignored = matches[:, order] != 0, ignored[:, order]
    return _Category(image_index[order], matched & ~ignored, ~matched & ~ignored, gt_per_image)


def _image_counts(draws: np.ndarray, n: int) -> np.ndarray:
    """[B, n] drawn image indices -> [B, n] how often each image was drawn (float)."""
    counts = np.zeros((len(draws), n))
    np.add.at(counts, (np.arange(len(draws))[:, None], draws), 1.0)
    return counts


@dataclass
class DropInterval:
    """``drop`` = AP(reference) − AP(candidate) in AP points (%), with its bootstrap interval."""
    reference_ap: float
    candidate_ap: float
    drop: float
    low: float
    high: float
    level: float
    resamples: int
    images: int

    def text(self) -> str:
        return f"{self.drop:.2f} ({self.level * 100:.0f}% CI {self.low:.2f}–{self.high:.2f})"

    def to_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(reference: MatchTable, candidate: MatchTable, resamples: int = DEFAULT_RESAMPLES,
                     level: float = DEFAULT_LEVEL, seed: int = 0) -> DropInterval:
    """The drop AP(reference) − AP(candidate) and its percentile interval over ``resamples`` image
    resamples, both models scored on the same resampled images each time."""
    if reference.image_ids != candidate.image_ids:
        raise ValueError("paired bootstrap needs both models evaluated on the same images")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples must be >= 1 and 0 < level < 1, got {resamples}, {level}")
    n = len(reference.image_ids)
    rng = np.random.default_rng(seed)
    drops = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        draws = rng.integers(0, n, (min(_CHUNK, resamples - start), n))     # the same stream as one draw per resample
        weights = _image_counts(draws, n)
        drops[start:start + len(draws)] = reference.ap_batch(weights) - candidate.ap_batch(weights)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(drops * 100, [tail, 100 - tail])
    ref, cand = reference.ap() * 100, candidate.ap() * 100
    return DropInterval(reference_ap=ref, candidate_ap=cand, drop=ref - cand, low=float(low),
                        high=float(high), level=level, resamples=resamples, images=n)


def evaluation_drop_interval(reference, candidate, resamples: int = DEFAULT_RESAMPLES,
                             level: float = DEFAULT_LEVEL, seed: int = 0) -> DropInterval:
    """:func:`drop_interval` of two ``yoloq.eval.coco_eval.EvalResult`` of the same ground truth, on
    the images both evaluated."""
    if reference.ann_file != candidate.ann_file:
        raise ValueError(f"paired bootstrap needs one ground truth, got {reference.ann_file} and {candidate.ann_file}")
    images = sorted(set(reference.image_ids) & set(candidate.image_ids))
    tables = [r.matches if r.matches is not None and r.matches.image_ids == images
              else match_table(r.ann_file, r.detections.to_list(), images) for r in (reference, candidate)]
    return paired_bootstrap(*tables, resamples, level, seed)


def drop_interval(ann_file: str, reference_detections: list, candidate_detections: list,
                  image_ids: Sequence[int], resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                  seed: int = 0) -> DropInterval:
    """:func:`paired_bootstrap` from two detection lists (COCO results format) on the same images."""
    return paired_bootstrap(match_table(ann_file, reference_detections, image_ids),
                            match_table(ann_file, candidate_detections, image_ids), resamples, level, seed)
