"""Image/label decoding and tensor preparation (resize + ImageNet normalisation, as the authors' code)."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class BadImageError(ValueError):
    """A file that cannot be decoded into the expected image or label array."""


def _open(data: bytes, path: str, expected: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{path}: expected {expected}, could not decode it ({e})") from e
    return img


def decode_image(data: bytes, path: str) -> np.ndarray:
    """Encoded bytes -> uint8 RGB array ``[H, W, 3]`` (grayscale/RGBA/palette/CMYK converted). 16-bit grayscale
    (Pillow's I;16 / I modes) is scaled to 8 bits (v / 257), not clipped to white as ``convert("RGB")`` would."""
    img = _open(data, path, "an RGB-convertible image (PNG/JPEG/...)")
    if img.mode.startswith("I"):
        gray = np.round(np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def decode_label(data: bytes, path: str) -> np.ndarray:
    """Encoded single-channel label map -> uint8 ``[H, W]``; palette PNGs keep raw indices."""
    expected = "a single-channel label map (L/P/I mode) with values in [0, 255]"
    img = _open(data, path, expected)
    if len(img.getbands()) != 1:
        raise BadImageError(f"{path}: expected {expected}, got {img.mode} with bands {img.getbands()}")
    label = np.array(img)
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise BadImageError(f"{path}: expected {expected}, got values in [{label.min()}, {label.max()}]")
        label = label.astype(np.uint8)
    return label


RESIZE_METHODS = ("antialias", "bilinear", "nearest")


def _resize_uint8(stack: np.ndarray, size: tuple[int, int], method: str) -> torch.Tensor:
    x = torch.from_numpy(stack).permute(0, 3, 1, 2).float().div_(255.0)
    if tuple(x.shape[-2:]) == tuple(size):
        return x.contiguous()
    if method == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=method == "antialias")


def to_float_batch(
    images: list[np.ndarray] | np.ndarray, size: tuple[int, int], method: str = "antialias"
) -> torch.Tensor:
    """uint8 HWC image(s) -> float NCHW in [0, 1] resized to ``size`` by `method`: antialias (bilinear,
    antialiased), bilinear (plain, align_corners False) or nearest (OpenCV's INTER_NEAREST rule).

    Accepts one ``[H, W, 3]`` array, an ``[N, H, W, 3]`` array or a list; equally shaped inputs
    are resized in a single batched call.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    if len(images) == 0:
        raise ValueError("to_float_batch needs at least one image")
    for im in images:
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"expected uint8 [H, W, 3] images, got {im.dtype} {im.shape}")
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r}: expected one of {', '.join(RESIZE_METHODS)}")
    if len({im.shape for im in images}) == 1:
        return _resize_uint8(np.stack(list(images)), size, method)
    return torch.cat([_resize_uint8(im[None].copy(), size, method) for im in images])


def resize_labels(
    labels: np.ndarray | torch.Tensor, size: tuple[int, int], mode: str = "nearest-exact"
) -> torch.Tensor:
    """Nearest-neighbour resize of ``[H, W]`` or ``[N, H, W]`` label maps (`nearest-exact` or the reference's
    `nearest`); dtype is kept."""
    t = torch.as_tensor(labels)
    if tuple(t.shape[-2:]) == tuple(size):
        return t.clone()
    x = t.reshape(-1, 1, *t.shape[-2:]).float()
    out = F.interpolate(x, size=size, mode=mode)
    return out.to(t.dtype).reshape(*t.shape[:-2], *size)
