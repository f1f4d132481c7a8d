import io

import numpy as np
from PIL import Image

from transfgu_dist.inference.viz import (
    UNMATCHED_RGB,
    colourise,
    confusion_matrix_png,
    overlay_panel,
    palette,
    per_class_iou_png,
)

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


def test_colourise_ignore_black_unmatched_grey():
    image = np.full((2, 2, 3), 100, np.uint8)
    out = colourise(image, np.array([[0, 255], [-1, 254]]), n_classes=3)
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])  # ignored
    np.testing.assert_array_equal(out[1, 0], np.round(0.35 * 100 + 0.65 * np.array(UNMATCHED_RGB)))  # unmatched
    np.testing.assert_array_equal(out[1, 0], out[1, 1])
    np.testing.assert_array_equal(out[0, 0], np.round(0.35 * 100 + 0.65 * palette(3)[0].astype(float)))


def test_overlay_panel_readable_size_with_legend():
    image = np.full((10, 12, 3), 128, np.uint8)
    gt = np.zeros((10, 12), np.uint8)
    pred = np.ones((10, 12), np.int64)
    pred[0] = -1
    three = open_png(overlay_panel(image, gt, pred, NAMES))
    assert three.height >= 320 and three.width >= 3 * 320 * 12 / 10
    two = open_png(overlay_panel(image, None, pred, NAMES))
    assert two.width < three.width and two.height == three.height


def test_confusion_matrix_png():
    conf = np.array([[5, 1, 0], [0, 0, 0], [2, 2, 6]])
    img = open_png(confusion_matrix_png(conf, NAMES))
    assert img.width > 100 and img.height > 100


def test_per_class_iou_png():
    img = open_png(per_class_iou_png(np.array([0.5, np.nan, 0.9]), NAMES))
    assert img.width == 600  # 6 inch x 100 dpi


def test_panels_are_capped_so_text_keeps_its_size():
    from transfgu_dist.inference.viz import cluster_sheet_png, panel_size

    assert panel_size(30, 40) == (330, 440)  # x11: the short side reaches 320
    assert panel_size(1630, 4030) == (388, 960)  # the long side capped at 960
    assert panel_size(400, 900) == (400, 900)
    big = overlay_panel(np.zeros((1630, 4030, 3), np.uint8), None, np.zeros((1630, 4030), np.int64), ["sky"])
    assert Image.open(io.BytesIO(big)).width < 2 * 960 + 100  # two panels of 960 px, not of 4030
    image, mask = np.full((8, 8, 3), 200, np.uint8), np.eye(8, dtype=bool)
    sheet = np.asarray(Image.open(io.BytesIO(cluster_sheet_png("cluster 3", [(image, mask)] * 2))).convert("RGB"))
    assert sheet.shape[1] >= 2 * 320 and {50, 200} <= set(np.unique(sheet))  # shown 200, darkened 200 * 0.25
