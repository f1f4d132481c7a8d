import io

import numpy as np
from PIL import Image

from transfgu_dist.viz import confusion_matrix_png, overlay_panel, palette, per_class_iou_png

NAMES = ["sky", "grass", "disk"]


def open_png(data: bytes) -> Image.Image:
    assert isinstance(data, bytes)
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return img


def test_palette_distinct_and_deterministic():
    p = palette(30)
    assert p.shape == (30, 3) and p.dtype == np.uint8
    assert len({tuple(c) for c in p}) == 30
    np.testing.assert_array_equal(p, palette(30))
    assert (p.max(1) > 0).all()  # black is reserved for ignored pixels


def test_overlay_panel_width_and_ignore_black():
    image = np.full((10, 12, 3), 128, np.uint8)
    gt = np.zeros((10, 12), np.uint8)
    gt[0, 0] = 255
    pred = np.ones((10, 12), np.int64)
    img = open_png(overlay_panel(image, gt, pred, n_classes=3))
    assert img.size == (36, 10)
    arr = np.array(img)
    np.testing.assert_array_equal(arr[:, :12], image)
    np.testing.assert_array_equal(arr[0, 12], [0, 0, 0])


def test_confusion_matrix_png():
    conf = np.array([[5, 1, 0], [0, 0, 0], [2, 2, 6]])
    img = open_png(confusion_matrix_png(conf, NAMES))
    assert img.width > 100 and img.height > 100


def test_per_class_iou_png():
    img = open_png(per_class_iou_png(np.array([0.5, np.nan, 0.9]), NAMES))
    assert img.width == 600  # 6 inch x 100 dpi
