"""Evaluation pictures returned as PNG bytes (local disk or object storage is the caller's job).

Charts draw on a bare ``matplotlib.figure.Figure`` with an explicit Agg canvas, so no GUI
backend or pyplot global state is ever touched; matplotlib is imported only when needed.
"""

from __future__ import annotations

import io

import numpy as np

from transfgu_dist.io.label_maps import IGNORE

GOLDEN = 0.6180339887498949


def palette(n: int) -> np.ndarray:
    """``n`` distinct, deterministic, non-black colours ``[n, 3]`` uint8 (golden-ratio hues)."""
    from matplotlib.colors import hsv_to_rgb

    i = np.arange(n)
    hsv = np.stack([(i * GOLDEN) % 1.0, 0.9 - 0.3 * (i // 2 % 2), 0.95 - 0.3 * (i % 2)], axis=1)
    return (hsv_to_rgb(hsv) * 255).round().astype(np.uint8)


UNMATCHED_RGB = (150, 150, 150)  # clusters without a class (grey; black stays "ignored")
PANEL_MIN_SIDE = 320  # panels are upscaled (nearest) until their short side is at least this
PANEL_MAX_SIDE = 960  # and downscaled (nearest) until their long side is at most this: titles and legends keep
# their size relative to the panel (a 4030 x 1630 photo had ~10 px text at full size)


def panel_size(h: int, w: int) -> tuple[int, int]:
    """The drawn (height, width) of an ``h x w`` panel: an integer upscale to a short side >= PANEL_MIN_SIDE, or a
    downscale to a long side <= PANEL_MAX_SIDE, aspect kept."""
    if max(h, w) > PANEL_MAX_SIDE:
        f = PANEL_MAX_SIDE / max(h, w)
        return max(1, round(h * f)), max(1, round(w * f))
    scale = max(1, -(-PANEL_MIN_SIDE // min(h, w)))
    return h * scale, w * scale


def resized(panel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB panel at ``size`` (h, w), nearest neighbour (label colours stay unmixed)."""
    from PIL import Image

    if panel.shape[:2] == size:
        return panel
    return np.asarray(Image.fromarray(panel).resize((size[1], size[0]), Image.Resampling.NEAREST))


def colourise(image: np.ndarray, label: np.ndarray, n_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
    """Blend class colours over ``image``: classes ``[0, n_classes)`` in ``palette`` colours, ``ignore_index``
    black, any other value (an unmatched cluster) grey."""
    label = np.asarray(label).astype(np.int64)
    colours = np.concatenate([palette(n_classes), np.array([UNMATCHED_RGB], np.uint8)])
    index = np.where((label >= 0) & (label < n_classes), label, n_classes)
    blended = 0.35 * image.astype(np.float32) + 0.65 * colours[index].astype(np.float32)
    return np.where((label == ignore_index)[..., None], 0, blended).round().astype(np.uint8)


def overlay_panel(
    image: np.ndarray, gt: np.ndarray | None, pred: np.ndarray, class_names: list[str], ignore_index: int = IGNORE
) -> bytes:
    """PNG of titled ``image | ground truth | prediction`` panels (no ground-truth panel when ``gt`` is None)
    with a legend of the class names and colours present, at a readable size (panel_size).

    ``pred`` holds class ids (clusters mapped through the Hungarian matching); values outside
    ``[0, len(class_names))`` other than ``ignore_index`` are unmatched clusters, drawn grey; ignored pixels black.
    """
    pred = np.asarray(pred).astype(np.int64)
    labels = [("ground truth", np.asarray(gt).astype(np.int64))] if gt is not None else []
    labels.append(("prediction", pred))
    for title, lab in labels:
        if lab.shape != image.shape[:2]:
            raise ValueError(f"image {image.shape[:2]} and {title} {lab.shape} must match")
    n = len(class_names)
    panels = [("image", image)] + [(t, colourise(image, lab, n, ignore_index)) for t, lab in labels]
    h, w = panel_size(*image.shape[:2])
    fig = _figure(len(panels) * w / 100 + 0.3, h / 100 + 1.3)
    for i, (title, panel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(resized(panel, (h, w)), interpolation="nearest")
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    present = np.unique(np.concatenate([lab.ravel() for _, lab in labels]))
    from matplotlib.patches import Patch

    handles = [Patch(color=palette(n)[c] / 255.0, label=class_names[c]) for c in present if 0 <= c < n]
    if (((present < 0) | (present >= n)) & (present != ignore_index)).any():
        handles.append(Patch(color=np.array(UNMATCHED_RGB) / 255.0, label="unmatched cluster"))
    if (present == ignore_index).any():
        handles.append(Patch(color="black", label="ignored"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False)
    return _figure_png(fig)


def cluster_sheet_png(title: str, tiles: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """PNG contact sheet of one cluster: a row of images (uint8 HWC, one size) with the cluster's pixels (bool
    masks) shown and the rest darkened, under `title`."""
    h, w = panel_size(*tiles[0][0].shape[:2])
    fig = _figure(len(tiles) * w / 100 + 0.3, h / 100 + 0.8)
    fig.suptitle(title, fontsize=11)
    for i, (image, mask) in enumerate(tiles):
        ax = fig.add_subplot(1, len(tiles), i + 1)
        shown = np.where(mask[..., None], image, (0.25 * image.astype(np.float32)).astype(np.uint8))
        ax.imshow(resized(shown, (h, w)), interpolation="nearest")
        ax.axis("off")
    return _figure_png(fig)


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
