"""Optional dense-CRF refinement of label maps (off by default; the paper reports without it, STEGO and later
methods with it), as a vectorised PyTorch mean-field on a local window (no extra package).

Energy (Kraehenbuehl & Koltun 2011, Potts compatibility): unary -log P from the decoder plus pairwise terms
w_bi exp(-|p_i-p_j|^2 / 2 theta_a^2 - |I_i-I_j|^2 / 2 theta_b^2) + w_sp exp(-|p_i-p_j|^2 / 2 theta_g^2), here
summed over the (window x window) neighbours of each pixel instead of all pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class CRFConfig:
    iterations: int = 5
    window: int = 7  # odd; neighbours considered per pixel
    w_bilateral: float = 4.0
    theta_a: float = 3.0  # pixels
    theta_b: float = 10.0  # colour levels (0-255)
    w_spatial: float = 3.0
    theta_g: float = 1.0  # pixels


def _neighbours(x: torch.Tensor, window: int) -> torch.Tensor:
    """(C, H, W) -> (C, window^2, H, W): each pixel's window (edges replicate)."""
    r = window // 2
    padded = F.pad(x[None], (r, r, r, r), mode="replicate")[0]
    C, H, W = x.shape
    return F.unfold(padded[None], window)[0].view(C, window * window, H, W)


@torch.no_grad()
def dense_crf(image: np.ndarray, logits: torch.Tensor, cfg: CRFConfig = CRFConfig()) -> torch.Tensor:
    """Refined class probabilities (K, H, W) for `logits` (K, H, W) at the size of `image` (H, W, 3) uint8."""
    rgb = torch.as_tensor(image, dtype=torch.float32, device=logits.device).permute(2, 0, 1)
    r = cfg.window // 2
    dy, dx = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0), indexing="ij")
    d2 = (dy**2 + dx**2).flatten().to(logits.device)[:, None, None]  # (window^2, 1, 1)
    colour = ((_neighbours(rgb, cfg.window) - rgb[:, None]) ** 2).sum(0)  # (window^2, H, W)
    kernel = cfg.w_bilateral * torch.exp(
        -d2 / (2 * cfg.theta_a**2) - colour / (2 * cfg.theta_b**2)
    ) + cfg.w_spatial * torch.exp(-d2 / (2 * cfg.theta_g**2))
    kernel[d2.flatten() == 0] = 0  # no message to itself
    unary = F.log_softmax(logits.float(), 0)
    q = unary.exp()
    for _ in range(cfg.iterations):
        message = (_neighbours(q, cfg.window) * kernel).sum(1)  # (K, H, W)
        q = F.softmax(unary + message, 0)  # Potts: agreeing neighbours lower a label's energy
    return q
