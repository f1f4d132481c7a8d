"""Bootstrapping losses (paper Eqs 9, 13-16).

`logits` are the student's (B, n_outputs, h, w) outputs before softmax; `target` hard labels (B, h, w) (-1 ignored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_TARGET = -1


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 9: CE(P, M), mean over labelled pixels."""
    return F.cross_entropy(logits, target, ignore_index=IGNORE_TARGET)


def peer_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, perm: torch.Tensor) -> torch.Tensor:
    """Eq. 13: CE(P, M-hat) - alpha CE(P, M-hat'), M-hat' = M-hat with its K channels shuffled by `perm`.

    Channel k of M-hat' is channel perm[k] of M-hat, so its argmax is perm^-1 of M-hat's argmax.
    """
    inverse = torch.argsort(perm)
    negative = torch.where(target == IGNORE_TARGET, target, inverse[target.clamp_min(0)])
    return cross_entropy(logits, target) - alpha * cross_entropy(logits, negative)


def uncertainty_loss(
    logits: torch.Tensor, valid: torch.Tensor | None = None, skip_channel0: bool = False
) -> torch.Tensor:
    """Eq. 14: 1 - mean over pixels of (p' - p''), the gap between the two largest class probabilities.

    Reference things-only variant: `skip_channel0` drops the background channel before the softmax and
    `valid` (B, h, w) keeps only pseudo-foreground pixels.
    """
    probs = (logits[:, 1:] if skip_channel0 else logits).softmax(dim=1)
    top2 = probs.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    if valid is not None:
        gap = gap[valid]
        if gap.numel() == 0:
            return logits.sum() * 0
    return 1 - gap.mean()


def diversity_loss(class_emb: torch.Tensor, kind: str) -> torch.Tensor:
    """Eq. 15 on the decoder's class embeddings C, (K, d) or (B, K, d).

    paper: 1 + (1/K^2) sum(C C^T) / sqrt(d). reference: mean over unordered pairs i < j of (1 + cos(C_i, C_j)).
    """
    c = class_emb if class_emb.dim() == 3 else class_emb.unsqueeze(0)
    K, d = c.shape[-2:]
    if kind == "paper":
        return 1 + (c @ c.transpose(-2, -1)).sum(dim=(-2, -1)).mean() / (K * K * math.sqrt(d))
    cn = F.normalize(c, dim=-1)
    cos = cn @ cn.transpose(-2, -1)
    i, j = torch.triu_indices(K, K, offset=1, device=c.device)
    return (1 + cos[:, i, j]).mean()


@dataclass
class LossTerms:
    total: torch.Tensor
    peer: torch.Tensor
    uncertainty: torch.Tensor
    diversity: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


def total_loss(
    peer: torch.Tensor, diversity: torch.Tensor, uncertainty: torch.Tensor, omega1: float, omega2: float
) -> LossTerms:
    """Eq. 16: L = L_peer + omega1 L_div + omega2 L_unc."""
    total = peer + omega1 * diversity + omega2 * uncertainty
    return LossTerms(total=total, peer=peer, uncertainty=uncertainty, diversity=diversity)
