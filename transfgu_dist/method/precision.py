"""The arithmetic precision the encoder runs in on a device."""

from __future__ import annotations

import torch


def autocast(dev: torch.device) -> torch.autocast:
    """bf16 autocast on GPU; a no-op on CPU."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
