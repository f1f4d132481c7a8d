"""Sliding-window crops and the attention foreground prior (paper sec 3.2, 4.2).

Windows live on the ViT token grid as int rows ``(beta_index, top, left, side)``. Two rules
(``crops.window_rule``): ``paper`` windows are b = int(beta*min(h, w)) tokens on a side, ``side * p``
pixels; ``reference`` windows (the authors' ``bbox_anchors.py``) cover b+1 tokens, ``(b+1)*p - 1``
pixels, so the last window of each row and column starts one token earlier.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import roi_align

FG, BG, DROP = 1, 0, -1
MODES = ("attention", "all_fg", "none")
WINDOW_RULES = ("reference", "paper")


def _starts(length: int, side: int, stride: int) -> np.ndarray:
    """Starts 0, t, 2t, ... that fit, plus one flush with the far edge: ceil((L-b)/t) + 1 of them."""
    starts = np.arange(0, length - side + 1, stride)
    return starts if starts[-1] == length - side else np.append(starts, length - side)


def _odd_starts(length: int, b: int) -> np.ndarray:
    """The authors' starts of odd-b windows on one axis: centres c with c - b/2 >= 0 and c + b/2 < length that are
    multiples of b/2 (of b, for integers; c + b/2 is never the last token, so none is flush), b tokens wide."""
    centres = np.arange(b, length, b)
    return centres[2 * centres + b < 2 * length] - b // 2


def _check_rule(rule: str) -> None:
    if rule not in WINDOW_RULES:
        raise ValueError(f"unknown crops.window_rule {rule!r}; expected one of {WINDOW_RULES}")


def sliding_windows(grid_h: int, grid_w: int, betas: Sequence[float], rule: str = "paper") -> np.ndarray:
    """Square windows of b = int(beta*min(h, w)) tokens and stride b/2 for every beta (sec 4.2).

    ``rule="reference"`` makes each window b+1 tokens wide (same stride) for an even b and follows the authors'
    centre rule for an odd one (_odd_starts). Returns (n, 4) int64 rows (beta_index, top, left, side) in token
    units, ordered by beta, then top, then left; 142 windows for an 80x80 grid and betas (0.5, 0.4, 0.3, 0.2) under
    either rule.
    """
    _check_rule(rule)
    rows = []
    for i, beta in enumerate(betas):
        if not 0 < beta <= 1:
            raise ValueError(f"window scale beta must lie in (0, 1], got {beta}")
        b = max(1, int(beta * min(grid_h, grid_w)))
        if rule == "reference" and b % 2:
            side, tops, lefts = b, _odd_starts(grid_h, b), _odd_starts(grid_w, b)
        else:
            stride = max(1, b // 2)
            side = min(b + 1, grid_h, grid_w) if rule == "reference" else b
            tops, lefts = _starts(grid_h, side, stride), _starts(grid_w, side, stride)
        top, left = np.meshgrid(tops, lefts, indexing="ij")
        rows.append(np.stack([np.full(top.size, i), top.ravel(), left.ravel(), np.full(top.size, side)], 1))
    return np.concatenate(rows).astype(np.int64)


def foreground_prior(attn: torch.Tensor) -> torch.Tensor:
    """Binarised CLS attention (sec 4.2): (B, h, w) -> bool, True strictly above each image's mean."""
    return attn > attn.mean(dim=(-2, -1), keepdim=True)


def fg_counts(
    fg: torch.Tensor, windows: np.ndarray, rule: str = "paper", patch_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground count (B, n) and area (n,) of every window of a (B, h, w) bool batch, from one batched summed-area
    table on fg's device, both float64.

    paper: tokens inside the window. reference: pixels of the token mask upsampled (nearest) by `patch_size` inside
    the window's pixel crop [y0:y1, x0:x1], which leaves out the last pixel row and column: its last token row and
    column weigh p - 1 pixels, the other tokens p, so count = p^2 S - p (S_last_row + S_last_col) + corner over
    ((side p) - 1)^2 pixels.
    """
    _check_rule(rule)
    sat = torch.nn.functional.pad(fg.to(torch.int32).cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    _, top, left, side = torch.as_tensor(np.asarray(windows), device=fg.device).T

    def total(y0, x0, y1, x1):  # fg tokens in rows [y0, y1) and columns [x0, x1)
        return (sat[:, y1, x1] - sat[:, y0, x1] - sat[:, y1, x0] + sat[:, y0, x0]).double()

    bottom, right = top + side, left + side
    count = total(top, left, bottom, right)
    if rule == "paper":
        return count, (side * side).double()
    p = patch_size
    last_row, last_col = total(bottom - 1, left, bottom, right), total(top, right - 1, bottom, right)
    corner = total(bottom - 1, right - 1, bottom, right)
    return p * p * count - p * (last_row + last_col) + corner, ((side * p - 1) ** 2).double()


def fg_fraction(fg: torch.Tensor, windows: np.ndarray, rule: str = "paper", patch_size: int = 1) -> np.ndarray:
    """Fraction of foreground inside each window (fg_counts); fg is an (h, w) bool mask."""
    return fg_fraction_batch(fg[None], windows, rule, patch_size)[0].cpu().numpy()


def fg_fraction_batch(fg: torch.Tensor, windows: np.ndarray, rule: str = "paper", patch_size: int = 1) -> torch.Tensor:
    """(B, n) float32 foreground fraction (fg_counts) of every window of every image of a (B, h, w) batch."""
    count, area = fg_counts(fg, windows, rule, patch_size)
    return (count / area).float()


def classify_windows(
    fg: torch.Tensor | None,
    windows: np.ndarray,
    mode: str,
    fg_min: float = 0.5,
    bg_min: float = 0.8,
    rule: str = "paper",
    patch_size: int = 1,
) -> np.ndarray:
    """Kind code (FG / BG / DROP) of every window, (n,) int8 (sec 4.2; the authors' thresholds are 0.5 and 0.8).

    "attention" (COCO): FG if the foreground fraction (fg_counts under `rule`) exceeds fg_min, BG if the
    background fraction exceeds bg_min, else DROP. "all_fg" (LIP) and "none" (Cityscapes, one pool): all FG;
    fg is only read in "attention" mode.
    """
    batch = None if fg is None else torch.as_tensor(fg)[None]
    kinds = classify_windows_batch(batch, windows, mode, fg_min, bg_min, images=1, rule=rule, patch_size=patch_size)
    return kinds[0].cpu().numpy()


def classify_windows_batch(
    fg: torch.Tensor | None,
    windows: np.ndarray,
    mode: str,
    fg_min: float = 0.5,
    bg_min: float = 0.8,
    images: int | None = None,
    rule: str = "paper",
    patch_size: int = 1,
) -> torch.Tensor:
    """classify_windows for a (B, h, w) batch at once: (B, n) int8 on fg's device (`images` = B when fg is None)."""
    if mode not in MODES:
        raise ValueError(f"unknown crop mode {mode!r}; expected one of {MODES}")
    if mode != "attention":
        return torch.full(
            (len(fg) if fg is not None else images, len(windows)),
            FG,
            dtype=torch.int8,
            device=None if fg is None else fg.device,
        )
    count, area = fg_counts(fg, windows, rule, patch_size)  # float64 as the thresholds: no float32 ties
    kinds = torch.full(count.shape, DROP, dtype=torch.int8, device=fg.device)
    kinds[(area - count) / area > bg_min] = BG
    kinds[count / area > fg_min] = FG
    return kinds


def windows_to_boxes(windows: np.ndarray, patch_size: int, rule: str = "paper") -> np.ndarray:
    """Token windows -> (n, 4) pixel boxes [x1, y1, x2, y2] (exclusive far edge).

    ``reference`` boxes end one pixel short of the window's last token ((b+1)*p - 1 px on a side).
    """
    _check_rule(rule)
    _, top, left, side = np.asarray(windows).T
    boxes = np.stack([left, top, left + side, top + side], 1) * patch_size
    if rule == "reference":
        boxes[:, 2:] -= 1
    return boxes


def cut_crops(images: torch.Tensor, boxes: torch.Tensor, out_size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinearly resample every box of a batch in one RoI-Align call.

    images (B, C, H, W); boxes (n, 5) rows [batch_idx, x1, y1, x2, y2] in pixel edges (pixel i
    spans [i, i+1], hence aligned=True); returns (n, C, *out_size). Bins average an adaptive
    number of bilinear samples, so downscaling is anti-aliased.
    """
    return roi_align(images, boxes.to(images), out_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
