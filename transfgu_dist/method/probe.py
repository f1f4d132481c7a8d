"""The linear probe: a 1x1 linear head from the frozen encoder's patch features to the ground-truth classes,
trained with labels (STEGO's "Linear" column). It is supervised: its figures measure the features, not TransFGU's
label-free segmentation, and are reported apart. Its outputs are classes, so it is scored with the identity
matching (method.metrics), not a Hungarian one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ProbeOutput:
    logits: torch.Tensor  # (B, n_classes, h, w) class scores at the patch grid, before softmax


class LinearProbe(nn.Module):
    """logits = W x^patch + b per patch token: a 1x1 convolution over the (B, h, w, D) patch features. Returns its
    logits as `.logits`, like the decoder, so the scoring code takes either."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.n_outputs = n_classes
        self.head = nn.Conv2d(dim, n_classes, kernel_size=1)

    def forward(self, patch: torch.Tensor) -> ProbeOutput:
        return ProbeOutput(logits=self.head(patch.permute(0, 3, 1, 2)))


def probe_loss(logits: torch.Tensor, gt: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Pixel cross-entropy of the logits (B, C, h, w) upsampled bilinearly (align_corners=False) to the labels'
    size (B, H, W); pixels labelled `ignore_index` are left out."""
    up = F.interpolate(logits, size=gt.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, gt.long(), ignore_index=ignore_index)


def probe_step(
    probe: nn.Module, optimizer: torch.optim.Optimizer, patch: torch.Tensor, gt: torch.Tensor, ignore_index: int
) -> float | None:
    """One optimizer step on a batch of frozen patch features and labels; the loss, or None (no step) when every
    pixel is ignored."""
    if not bool((gt != ignore_index).any()):
        return None
    loss = probe_loss(probe(patch).logits, gt, ignore_index)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss)
