"""Image/label decoding and tensor preparation (resize + ImageNet normalisation, as the authors' code)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from transfgu_dist.method.resizing import unit_float


class BadImageError(ValueError):
    """A file that cannot be decoded into the expected image or label array."""


def _open(data: bytes, path: str, expected: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{path}: expected {expected}, could not decode it ({e})") from e
    return img


def as_rgb(image: Any) -> np.ndarray:
    """Any image -> uint8 RGB ``[H, W, 3]``: a PIL image (grayscale/RGBA/palette/CMYK converted), an HWC array
    (uint8; other integers are 16-bit values, scaled to 8 bits as v / 257, as Pillow's I;16 / I modes are, not
    clipped to white as ``convert("RGB")`` would; floats in [0, 1]), or a CHW / HW tensor. Decoding, the stages and
    the Python API all use it."""
    if isinstance(image, Image.Image):
        image = np.asarray(image) if image.mode.startswith("I") else np.array(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        image = (t.permute(1, 2, 0) if t.ndim == 3 and t.shape[0] in (1, 3) else t).numpy()
    a = np.asarray(image)
    if np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:
        a = np.round(np.clip(a.astype(np.float64), 0, 65535) / 257).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image (H, W[, 1|3|4]) or a PIL image, got shape {a.shape}")
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else np.ascontiguousarray(a[..., :3])


def decode_image(data: bytes, path: str) -> np.ndarray:
    """Encoded bytes -> uint8 RGB array ``[H, W, 3]`` (as_rgb)."""
    return as_rgb(_open(data, path, "an RGB-convertible image (PNG/JPEG/...)"))


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


def model_input(image: Any, size: tuple[int, int], method: str = "antialias") -> np.ndarray:
    """The one preprocessing of an image before the encoder, shared by the stages, predict, the Python API, the
    MLflow pyfunc and the exported model: as_rgb, resized to ``size`` by `method` (to_float_batch), ``[H, W, 3]``.
    `nearest` keeps uint8 (exact); the other methods keep float32 in [0, 1], as the reference normalises the
    bilinear resize's values without rounding them back to 8 bits. model_batch turns a stack into the float input."""
    x = to_float_batch(as_rgb(image), size, method)[0].permute(1, 2, 0)
    return x.mul(255).round().to(torch.uint8).numpy() if method == "nearest" else x.numpy()


def model_batch(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """model_input images stacked (B, H, W, 3), uint8 or float32 -> float (B, 3, H, W) in [0, 1] on `device`."""
    return unit_float(torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2))


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
