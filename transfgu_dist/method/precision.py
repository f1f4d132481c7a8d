"""The arithmetic precision the encoder runs in: `fp32` (the authors' code, fp32 throughout), `tf32` (fp32 tensors,
TF32 matrix units on CUDA; fp32 on CPU) or `bf16` (bf16 autocast; on CPU an emulation of the GPU's numbers)."""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Iterator

import torch

from transfgu_dist.config.schema import Precision

PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


@contextlib.contextmanager
def autocast(dev: torch.device, precision: str = "fp32") -> Iterator[None]:
    """Run the enclosed forwards on `dev` in `precision` (PRECISIONS); CUDA's TF32 switches are restored after."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    tf32 = precision == "tf32"
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if dev.type == "cuda":  # cuDNN convolutions (the patch embedding) default to TF32: fp32 turns it off
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
