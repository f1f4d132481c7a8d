"""Segmenter inference options on a tiny random model: sliding windows, CRF in the evaluate forward."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from transfgu_dist.config import ARCHS, DecoderConfig, EncoderConfig
from transfgu_dist.inference.segmenter import Segmenter, SlidingWindow, cluster_logits, predict, window_origins
from transfgu_dist.io.images import to_float_batch
from transfgu_dist.io.weights import build_encoder
from transfgu_dist.method.crf import CRFConfig
from transfgu_dist.method.decoder import MaskTransformer

K = 5


def tiny(size: tuple[int, int] = (32, 48)) -> Segmenter:
    torch.manual_seed(0)
    enc, dec = EncoderConfig(arch="vit_tiny_test", weights="random"), DecoderConfig()
    return Segmenter(build_encoder(enc), MaskTransformer(ARCHS[enc.arch][1], K, dec).eval(), enc, dec, size)


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)


def test_window_origins_cover_the_image_and_end_at_its_edges():
    origins = window_origins((40, 70), (32, 48), 16)
    assert origins == [(0, 0), (0, 16), (0, 22), (8, 0), (8, 16), (8, 22)]  # ys 0, 8 (edge); xs 0, 16, 22 (edge)
    covered = np.zeros((40, 70), int)
    for y, x in origins:
        covered[y : y + 32, x : x + 48] += 1
    assert covered.min() == 1 and covered[20, 20] == 4 and covered[0, 69] == 1
    assert window_origins((32, 48), (32, 48), 7) == [(0, 0)]


def test_sliding_equals_plain_for_an_image_of_the_window_size():
    seg, im = tiny(), image(32, 48)
    plain = seg.scores(im)
    seg.sliding = SlidingWindow((32, 48), stride=16)
    torch.testing.assert_close(seg.scores(im), plain, rtol=0, atol=0)
    np.testing.assert_array_equal(seg.segment(im)[0], seg.labels(plain))


def test_sliding_averages_overlapping_windows_at_the_image_resolution():
    seg = tiny()
    seg.sliding = SlidingWindow((32, 48), stride=16, batch_size=4)  # 6 windows: two forwards
    im = image(40, 70, 1)
    scores = seg.scores(im)
    assert scores.shape == (K, 40, 70) and torch.isfinite(scores).all()
    x = to_float_batch(im, (40, 70))[0]
    win = {
        o: F.interpolate(
            cluster_logits(seg.encoder, seg.decoder, x[None, :, o[0] : o[0] + 32, o[1] : o[1] + 48]),
            size=(32, 48),
            mode="bilinear",
            align_corners=False,
        )[0]
        for o in window_origins((40, 70), (32, 48), 16)
    }
    torch.testing.assert_close(scores[:, 0, 0], win[(0, 0)][:, 0, 0])  # one window
    torch.testing.assert_close(scores[:, 39, 69], win[(8, 22)][:, 31, 47])  # one window
    torch.testing.assert_close(scores[:, 4, 20], (win[(0, 0)][:, 4, 20] + win[(0, 16)][:, 4, 4]) / 2)  # two
    small = seg.segment(image(20, 30, 2))[0]  # shorter than the window: upscaled, labels at its own size
    assert small.shape == (20, 30) and small.max() < K


def test_evaluate_forward_with_crf_equals_segment_with_crf():
    seg = tiny((32, 32))
    seg.crf = CRFConfig()
    ims = [image(32, 32, s) for s in range(2)]
    batch = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float().div(255)
    refined = predict(seg.encoder, seg.decoder, batch, (32, 32), CRFConfig())
    np.testing.assert_array_equal(refined, np.stack(seg.segment(ims)))
    assert (refined != predict(seg.encoder, seg.decoder, batch, (32, 32))).any()  # the CRF changes labels
