import numpy as np
import pytest
import torch

from transfgu_dist.method.crops import (
    BG,
    DROP,
    FG,
    classify_windows,
    cut_crops,
    fg_fraction,
    foreground_prior,
    sliding_windows,
    windows_to_boxes,
)

BETAS = (0.5, 0.4, 0.3, 0.2)


def test_reference_window_count_on_80x80_grid():
    windows = sliding_windows(80, 80, BETAS)
    # sides 40/32/24/16, strides 20/16/12/8 -> 3x3 + 4x4 + 6x6 + 9x9 (the authors' bbox_anchors.py)
    assert len(windows) == 142
    assert np.bincount(windows[:, 0]).tolist() == [9, 16, 36, 81]
    assert [int(windows[windows[:, 0] == i, 3][0]) for i in range(4)] == [40, 32, 24, 16]


def test_window_count_for_480x640_image():
    # patch 8 -> 60x80 grid, min side 60; n(L) = ceil((L - b) / t) + 1
    # beta .5: b=30 t=15 -> n(60)=3, n(80)=ceil(50/15)+1=5 -> 15
    # beta .4: b=24 t=12 -> n(60)=4, n(80)=ceil(56/12)+1=6 -> 24
    # beta .3: b=18 t=9  -> n(60)=ceil(42/9)+1=6, n(80)=ceil(62/9)+1=8 -> 48
    # beta .2: b=12 t=6  -> n(60)=9, n(80)=ceil(68/6)+1=13 -> 117
    windows = sliding_windows(60, 80, BETAS)
    assert np.bincount(windows[:, 0]).tolist() == [15, 24, 48, 117]
    assert len(windows) == 204


def test_windows_add_one_flush_with_far_edge():
    # 10x7 grid, beta .6: b=int(4.2)=4, t=2; rows 0,2,4,6 (6+4=10); cols 0,2 then flush at 7-4=3
    windows = sliding_windows(10, 7, (0.6,))
    tops, lefts = np.meshgrid([0, 2, 4, 6], [0, 2, 3], indexing="ij")
    expected = np.stack([np.zeros(12), tops.ravel(), lefts.ravel(), np.full(12, 4)], 1)
    np.testing.assert_array_equal(windows, expected)


def test_foreground_prior_is_strictly_above_mean():
    attn = torch.tensor([[[0.1, 0.2], [0.3, 0.4]], [[0.0, 3.0], [1.0, 0.0]]])  # means 0.25 and 1.0
    expected = torch.tensor([[[False, False], [True, True]], [[False, True], [False, False]]])
    assert torch.equal(foreground_prior(attn), expected)


def test_classify_windows_attention():
    fg = torch.zeros(5, 8, dtype=torch.bool)
    fg[:, :2] = True  # columns 0 and 1 are foreground
    windows = np.array(
        [
            [0, 0, 0, 2],  # cols 0-1: fg 4/4 -> FG
            [0, 3, 5, 2],  # cols 5-6: fg 0/4 -> BG
            [0, 0, 1, 2],  # cols 1-2: fg 2/4 = 0.5, not > 0.5 -> DROP
            [0, 0, 1, 5],  # cols 1-5: fg 5/25, bg 0.8 not > 0.8 -> DROP
            [0, 0, 2, 5],  # cols 2-6: fg 0/25 -> BG
            [0, 1, 0, 3],  # cols 0-2: fg 6/9 -> FG
        ]
    )
    np.testing.assert_allclose(fg_fraction(fg, windows), [1, 0, 0.5, 0.2, 0, 2 / 3])
    assert classify_windows(fg, windows, "attention").tolist() == [FG, BG, DROP, DROP, BG, FG]


@pytest.mark.parametrize("mode", ["all_fg", "none"])
def test_classify_windows_single_pool_modes(mode):
    windows = sliding_windows(6, 6, (0.5,))
    assert (classify_windows(None, windows, mode) == FG).all()


def test_classify_windows_unknown_mode():
    with pytest.raises(ValueError, match="bogus"):
        classify_windows(torch.zeros(4, 4, dtype=torch.bool), sliding_windows(4, 4, (0.5,)), "bogus")


def test_windows_to_boxes():
    windows = np.array([[0, 1, 2, 3], [1, 0, 0, 5]])
    np.testing.assert_array_equal(windows_to_boxes(windows, 8), [[16, 8, 40, 32], [0, 0, 40, 40]])


def test_cut_crops_of_horizontal_ramp():
    # pixel x holds value x (+100 in image 1); pixel x spans [x, x+1], so the ramp is u - 0.5 at u
    ramp = torch.arange(16.0).expand(3, 8, 16)
    images = torch.stack([ramp, ramp + 100])
    boxes = torch.tensor([[1, 2, 0, 10, 8], [0, 4, 2, 8, 6], [0, 0, 0, 16, 8]])
    crops = cut_crops(images, boxes, 4)
    assert crops.shape == (3, 3, 4, 4)
    # box x 2..10 into 4 bins of width 2: centres 3, 5, 7, 9 -> 2.5, 4.5, 6.5, 8.5
    assert torch.equal(crops[0], torch.tensor([102.5, 104.5, 106.5, 108.5]).expand(3, 4, 4))
    # box x 4..8 into 4 bins of width 1: centres 4.5 .. 7.5 -> 4, 5, 6, 7
    assert torch.equal(crops[1], torch.tensor([4.0, 5.0, 6.0, 7.0]).expand(3, 4, 4))
    # whole width into 4 bins of width 4, each averaging 4 samples: centres 2, 6, 10, 14 -> 1.5, ...
    assert torch.equal(crops[2], torch.tensor([1.5, 5.5, 9.5, 13.5]).expand(3, 4, 4))
    assert cut_crops(images, boxes, (2, 4)).shape == (3, 3, 2, 4)


def test_batched_window_classification_equals_per_image():
    """classify_windows_batch / fg_fraction_batch on a batch == classify_windows / fg_fraction image by image."""
    from transfgu_dist.method.crops import classify_windows_batch, fg_fraction_batch

    fg = torch.rand(5, 10, 12, generator=torch.Generator().manual_seed(0)) > 0.5
    fg[0] = True
    fg[1] = False
    windows = sliding_windows(10, 12, (0.5, 0.4, 0.3, 0.2))
    kinds = classify_windows_batch(fg, windows, "attention", 0.5, 0.8)
    frac = fg_fraction_batch(fg, windows)
    for i in range(len(fg)):
        assert np.array_equal(kinds[i].numpy(), classify_windows(fg[i], windows, "attention", 0.5, 0.8))
        assert np.allclose(frac[i].numpy(), fg_fraction(fg[i], windows))
    brute = [[fg[i, t : t + b, x : x + b].float().mean().item() for _, t, x, b in windows] for i in range(len(fg))]
    assert np.allclose(frac.numpy(), brute)  # the summed-area table against slicing every window
    assert (kinds[0] == FG).all() and (kinds[1] == BG).all()
    assert classify_windows_batch(None, windows, "none", images=3).shape == (3, len(windows))
