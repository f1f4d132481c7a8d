import io

import numpy as np
import pytest
import torch
from PIL import Image

from transfgu_dist.io.images import BadImageError, decode_image, decode_label, resize_labels, to_float_batch
from transfgu_dist.method.encoder import normalize


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
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]], dtype=torch.uint8)
    torch.testing.assert_close(out, expected)
    assert resize_labels(torch.zeros(3, 8, 8, dtype=torch.long), (2, 4)).shape == (3, 2, 4)


def test_16bit_png_matches_its_8bit_version_within_one_level():
    """A 16-bit grayscale PNG is scaled (v / 257), not clipped to white: equal to its 8-bit version within 1 level."""
    ramp8 = np.arange(0, 256, 15, dtype=np.uint8).reshape(2, 9)[None].repeat(3, 0).reshape(6, 9)
    ramp16 = np.minimum(ramp8.astype(np.uint32) * 257 + 100, 65535).astype(np.uint16)  # +100: < half a level
    buf = io.BytesIO()
    Image.fromarray(ramp16).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")  # really a 16-bit file
    img16, img8 = decode_image(buf.getvalue(), "a16.png"), decode_image(encode(ramp8), "a8.png")
    assert img16.shape == (6, 9, 3) and img16.dtype == np.uint8
    assert np.abs(img16.astype(int) - img8).max() <= 1
    assert img16[0, 0, 0] == 0 and img16[..., 0].max() == 255  # not all white


@pytest.mark.parametrize("shape", [(1, 1), (20, 2000), (2000, 20)])
def test_extreme_shapes_decode_and_resize(shape):
    rgb = np.full((*shape, 3), 77, np.uint8)
    img = decode_image(encode(rgb), "odd.png")
    assert img.shape == (*shape, 3)
    out = to_float_batch(img, (16, 16))
    assert out.shape == (1, 3, 16, 16) and torch.allclose(out, torch.full_like(out, 77 / 255), atol=1e-3)


def test_cmyk_jpeg_becomes_rgb():
    buf = io.BytesIO()
    Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(buf, format="JPEG")  # pure red in CMYK
    img = decode_image(buf.getvalue(), "cmyk.jpg")
    assert img.shape == (3, 4, 3) and img[..., 0].min() > 200 and img[..., 1:].max() < 60


def test_as_rgb_scales_16_bit_pil_images_and_arrays_as_decoding_does():
    from transfgu_dist.io.images import as_rgb, model_input

    values = np.array([[0, 257, 514], [65535, 128, 129]], np.uint16)  # v / 257 rounded: 0, 1, 2, 255, 0, 1
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    decoded = decode_image(buf.getvalue(), "gray16.png")
    pil = Image.open(io.BytesIO(buf.getvalue()))
    assert pil.mode == "I;16"
    expected = np.repeat(np.array([[0, 1, 2], [255, 0, 1]], np.uint8)[..., None], 3, axis=2)
    for way in (decoded, as_rgb(pil), as_rgb(values), as_rgb(values.astype(np.int32))):
        np.testing.assert_array_equal(way, expected)
    assert as_rgb(np.array([[0.5]], np.float32)).tolist() == [[[128, 128, 128]]]  # floats are [0, 1]
    # the one preprocessing: a bilinear resize stays float (a 2 -> 1 pixel mean of 1 and 2 is 1.5/255, not rounded);
    # nearest keeps uint8
    row = np.array([[[1, 1, 1], [2, 2, 2]]], np.uint8)
    np.testing.assert_allclose(model_input(row, (1, 1), "bilinear"), np.full((1, 1, 3), 1.5 / 255), rtol=1e-6)
    assert model_input(row, (1, 1), "nearest").dtype == np.uint8
    assert model_input(Image.fromarray(values), (2, 3)).dtype == np.float32
