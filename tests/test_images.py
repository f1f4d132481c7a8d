import io

import numpy as np
import pytest
import torch
from PIL import Image

from transfgu_dist.images import (
    BadImageError,
    decode_image,
    decode_label,
    normalize,
    resize_labels,
    to_float_batch,
)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_png_and_jpeg():
    rgb = np.zeros((6, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    np.testing.assert_array_equal(decode_image(encode(rgb), "a.png"), rgb)
    jpeg = decode_image(encode(rgb, "JPEG"), "a.jpg")
    assert jpeg.shape == (6, 5, 3) and jpeg.dtype == np.uint8
    assert np.abs(jpeg.astype(int) - rgb).max() <= 3  # lossy, flat colour survives closely


def test_grayscale_and_rgba_become_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = decode_image(encode(gray), "g.png")
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    rgba = np.full((2, 2, 4), 9, np.uint8)
    np.testing.assert_array_equal(decode_image(encode(rgba), "a.png"), np.full((2, 2, 3), 9))


def test_label_keeps_palette_indices():
    idx = np.array([[0, 3], [255, 1]], np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette([10, 20, 30] * 256)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    np.testing.assert_array_equal(decode_label(buf.getvalue(), "l.png"), idx)


def test_corrupt_bytes_raise_with_path():
    with pytest.raises(BadImageError, match="bucket/x/broken.png") as info:
        decode_image(b"not an image at all", "bucket/x/broken.png")
    assert "expected" in str(info.value)
    truncated = encode(np.zeros((32, 32, 3), np.uint8))[:40]
    with pytest.raises(BadImageError, match="cut.png"):
        decode_label(truncated, "cut.png")


def test_rgb_label_rejected():
    with pytest.raises(BadImageError, match="rgb_label.png"):
        decode_label(encode(np.zeros((2, 2, 3), np.uint8)), "rgb_label.png")


def test_normalize_one_pixel_by_hand():
    x = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1)
    # ((1 - .485)/.229, (.5 - .456)/.224, (0 - .406)/.225)
    expected = torch.tensor([0.515 / 0.229, 0.044 / 0.224, -0.406 / 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x), expected)


def test_to_float_batch():
    a = np.full((8, 6, 3), 255, np.uint8)
    b = np.zeros((4, 4, 3), np.uint8)
    same = to_float_batch([a, a], (4, 4))
    assert same.shape == (2, 3, 4, 4) and same.dtype == torch.float32
    torch.testing.assert_close(same, torch.ones(2, 3, 4, 4))  # flat image stays flat
    mixed = to_float_batch([a, b], (4, 4))
    torch.testing.assert_close(mixed[1], torch.zeros(3, 4, 4))
    assert to_float_batch(b, (4, 4)).shape == (1, 3, 4, 4)


def test_resize_labels_nearest():
    lab = np.array([[0, 1], [2, 255]], np.uint8)
    out = resize_labels(lab, (4, 4))
    expected = torch.tensor(
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]], dtype=torch.uint8
    )
    torch.testing.assert_close(out, expected)
    assert resize_labels(torch.zeros(3, 8, 8, dtype=torch.long), (2, 4)).shape == (3, 2, 4)
