"""Evaluation pictures returned as PNG bytes (local disk or object storage is the caller's job).

Charts draw on a bare ``matplotlib.figure.Figure`` with an explicit Agg canvas, so no GUI
backend or pyplot global state is ever touched; matplotlib is imported only when needed.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

GOLDEN = 0.6180339887498949


def palette(n: int) -> np.ndarray:
    """``n`` distinct, deterministic, non-black colours ``[n, 3]`` uint8 (golden-ratio hues)."""
    from matplotlib.colors import hsv_to_rgb

    i = np.arange(n)
    hsv = np.stack([(i * GOLDEN) % 1.0, 0.9 - 0.3 * (i // 2 % 2), 0.95 - 0.3 * (i % 2)], axis=1)
    return (hsv_to_rgb(hsv) * 255).round().astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _colourise(image: np.ndarray, label: np.ndarray, colours: np.ndarray, ignore_index: int) -> np.ndarray:
    """Blend class colours over ``image``; ignored or out-of-range labels become black."""
    n = len(colours)
    valid = (label >= 0) & (label < n) & (label != ignore_index)
    colour = colours[np.where(valid, label, 0)].astype(np.float32)
    blended = 0.35 * image.astype(np.float32) + 0.65 * colour
    return np.where(valid[..., None], blended, 0).round().astype(np.uint8)


def overlay_panel(
    image: np.ndarray, gt: np.ndarray, pred: np.ndarray, n_classes: int, ignore_index: int = 255
) -> bytes:
    """PNG of ``image | ground truth | prediction`` side by side (width ``3 * W``).

    ``pred`` should already be in gt class ids (e.g. clusters mapped through the Hungarian
    matching); labels equal to ``ignore_index`` or outside ``[0, n_classes)`` are drawn black.
    """
    gt, pred = np.asarray(gt).astype(np.int64), np.asarray(pred).astype(np.int64)
    if gt.shape != image.shape[:2] or pred.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape[:2]}, gt {gt.shape} and pred {pred.shape} must match")
    colours = palette(n_classes)
    panels = [image] + [_colourise(image, lab, colours, ignore_index) for lab in (gt, pred)]
    return _png(np.concatenate(panels, axis=1))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def confusion_matrix_png(conf: np.ndarray, class_names: list[str]) -> bytes:
    """Row-normalised (per gt class) confusion heat map; rows gt, columns matched prediction."""
    conf = np.asarray(conf, dtype=np.float64)
    rows = conf.sum(1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    n = len(class_names)
    side = 2.5 + 0.35 * n
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("prediction (matched)")
    ax.set_ylabel("ground truth")
    if n <= 15:
        for (r, c), v in np.ndenumerate(norm):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.5 else "k")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of gt pixels")
    return _figure_png(fig)


def per_class_iou_png(iou: np.ndarray, class_names: list[str]) -> bytes:
    """Horizontal IoU bar per class (nan drawn as an empty 'n/a' bar) with the mIoU line."""
    iou = np.asarray(iou, dtype=np.float64)
    n = len(class_names)
    fig = _figure(6.0, 1.0 + 0.3 * n)
    ax = fig.add_subplot()
    ax.barh(range(n), np.nan_to_num(iou), color=palette(n) / 255.0)
    for i in np.flatnonzero(np.isnan(iou)):
        ax.text(0.01, i, "n/a", va="center", fontsize=8)
    if not np.isnan(iou).all():
        miou = float(np.nanmean(iou))
        ax.axvline(miou, color="k", linestyle="--", label=f"mIoU {miou:.3f}")
        ax.legend(loc="lower right")
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("IoU")
    return _figure_png(fig)
