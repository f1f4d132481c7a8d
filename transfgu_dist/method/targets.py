"""Training targets from the pseudo-label bank: Eqs 6, 8 and the bootstrapped labels of Eqs 10-12.

The bank stores raw response maps M (Eq. 7); everything here runs when a batch is loaded, so T_bg or the
normalisation can change (e.g. in a sweep) without recomputing Grad-CAM.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from transfgu_dist.config import LossConfig


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Reference: per-sample min-max normalisation over all channels and pixels of (B, K, h, w)."""
    lo = maps.amin(dim=(1, 2, 3), keepdim=True)
    hi = maps.amax(dim=(1, 2, 3), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def split_fg_bg(maps: torch.Tensor, fg_prior: torch.Tensor, is_fg: torch.Tensor) -> torch.Tensor:
    """Sec 4.2: on foreground-prior pixels background concepts get no probability, and vice versa.

    maps (B, K, h, w), fg_prior (B, h, w) bool, is_fg (K,) bool. Excluded entries become -inf.
    """
    allowed = fg_prior.unsqueeze(1) == is_fg.view(1, -1, 1, 1)
    return maps.masked_fill(~allowed, float("-inf"))


def with_background(maps: torch.Tensor, t_bg: float) -> torch.Tensor:
    """Eq. 8: prepend M^bg = ReLU(T_bg - max_k M^k) as channel 0 (things-only presets)."""
    bg = (t_bg - maps.amax(dim=1, keepdim=True)).clamp_min(0)
    return torch.cat([bg, maps], dim=1)


def soft_targets(
    maps: torch.Tensor,
    *,
    norm: str,
    t_bg: float | None,
    fg_prior: torch.Tensor | None = None,
    is_fg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Response maps -> per-channel scores M used as labels: normalise, fg/bg split, background channel."""
    if norm == "minmax":
        maps = minmax(maps)
    if fg_prior is not None and is_fg is not None:
        maps = split_fg_bg(maps, fg_prior, is_fg)
    if t_bg is not None:
        maps = with_background(maps, t_bg)
    return maps


def fg_bg_split(enabled: bool, is_fg: np.ndarray) -> np.ndarray | None:
    """The concepts' fg flags when the fg/bg split applies (configured, and both pools non-empty), else None."""
    return is_fg if enabled and 0 < int(is_fg.sum()) < len(is_fg) else None


def label_scores(
    maps: torch.Tensor, fg_prior: torch.Tensor, is_fg: torch.Tensor | None, loss: LossConfig
) -> torch.Tensor:
    """The soft labels M of response maps as training makes them (Eq. 8 / min-max, fg/bg split, background)."""
    return soft_targets(
        maps,
        norm=loss.label_norm,
        t_bg=loss.t_bg if loss.background_channel else None,
        fg_prior=fg_prior if is_fg is not None else None,
        is_fg=is_fg,
    )


def hard_labels(scores: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Eqs 6 and 11: argmax over channels, then nearest upsampling to `size` when given. (B, h, w) int64."""
    labels = scores.argmax(dim=1)
    if size is not None and tuple(labels.shape[-2:]) != tuple(size):
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return labels


def bootstrapped(scores: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 12: M-hat^k = 0.5 (M^k + P-hat^k), with P-hat = softmax of the teacher's logits (Eq. 10)."""
    return 0.5 * (scores + teacher_logits.softmax(dim=1))
