"""Unsupervised segmentation scores (paper sec 4.1), as the authors' `utils/metric.py` computes them.

Predicted cluster ids carry no class meaning, so a confusion matrix ``conf[gt, pred]`` is
accumulated over the whole evaluation split and aligned to the ground truth by ONE Hungarian
matching that maximises matched pixels. mIoU and pixel accuracy are read off the matched matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

ArrayLike = np.ndarray | torch.Tensor


def _flat_int64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(np.int64, copy=False).ravel()


def confusion_matrix(gt: ArrayLike, pred: ArrayLike, n_gt: int, n_pred: int, ignore_index: int) -> np.ndarray:
    """Pixel counts ``conf[g, p]`` (int64, ``[n_gt, n_pred]``) over any array shape.

    Pixels whose gt equals ``ignore_index`` or lies outside ``[0, n_gt)`` are not counted
    (the reference maps ignored pixels to -1). Counted predictions must lie in ``[0, n_pred)``.
    """
    g, p = _flat_int64(gt), _flat_int64(pred)
    if g.shape != p.shape:
        raise ValueError(f"gt has {g.size} pixels but pred has {p.size}")
    keep = (g >= 0) & (g < n_gt) & (g != ignore_index)
    g, p = g[keep], p[keep]
    if p.size and (p.min() < 0 or p.max() >= n_pred):
        raise ValueError(f"pred values must lie in [0, {n_pred}), got [{p.min()}, {p.max()}]")
    return np.bincount(g * n_pred + p, minlength=n_gt * n_pred).reshape(n_gt, n_pred)


def hungarian_match(conf: np.ndarray) -> np.ndarray:
    """One-to-one cluster -> class matching maximising matched pixels.

    Returns ``matching`` of length ``n_pred``: the gt class of each predicted cluster, or -1
    for clusters left unmatched (only possible when ``n_pred > n_gt``).
    """
    gt_idx, pred_idx = linear_sum_assignment(conf, maximize=True)
    matching = np.full(conf.shape[1], -1, dtype=np.int64)
    matching[pred_idx] = gt_idx
    return matching


@dataclass
class Scores:
    """Split-level scores after Hungarian matching; IoU/accuracy are fractions in [0, 1]."""

    miou: float
    pixel_accuracy: float
    per_class_iou: np.ndarray  # [n_gt], nan for classes absent from both gt and prediction
    matching: np.ndarray  # [n_pred], matched gt class per cluster or -1
    confusion: np.ndarray  # [n_gt, n_gt], columns = predicted clusters mapped to gt classes

    def to_dict(self) -> dict:
        """JSON-ready copy: Python scalars/lists, nan written as None."""

        def num(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return {
            "miou": num(self.miou),
            "pixel_accuracy": num(self.pixel_accuracy),
            "per_class_iou": [num(x) for x in self.per_class_iou],
            "matching": self.matching.tolist(),
            "confusion": self.confusion.tolist(),
        }


def scores_from_confusion(conf: np.ndarray, matching: np.ndarray | None = None) -> Scores:
    """mIoU and pixel accuracy from a whole-split ``conf[gt, pred]``.

    IoU_c = TP/(TP+FP+FN). Pixels predicted as unmatched clusters count as misses of their gt
    class. mIoU averages over gt classes present in the gt or in the matched prediction.
    ``matching`` (the gt class of each prediction) replaces the Hungarian one: the identity for a
    head trained with labels, whose outputs are classes (a linear probe).
    """
    conf = np.asarray(conf, dtype=np.int64)
    n_gt, n_pred = conf.shape
    matching = hungarian_match(conf) if matching is None else np.asarray(matching, dtype=np.int64)
    to_gt = np.zeros((n_pred, n_gt), dtype=np.int64)  # one-hot cluster -> class map
    matched = np.flatnonzero(matching >= 0)
    to_gt[matched, matching[matched]] = 1
    merged = conf @ to_gt

    tp = np.diag(merged).astype(np.float64)
    union = conf.sum(1) + merged.sum(0) - tp  # gt pixels (incl. unmatched preds) + FP
    present = union > 0
    iou = np.full(n_gt, np.nan)
    iou[present] = tp[present] / union[present]
    total = conf.sum()
    return Scores(
        miou=float(iou[present].mean()) if present.any() else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
        per_class_iou=iou,
        matching=matching,
        confusion=merged,
    )
