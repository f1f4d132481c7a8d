import pytest
import torch

from transfgu_dist.method.augment import AugmentConfig, crop_and_flip, photometric, random_crop_boxes

NO_FLIP = AugmentConfig(flip_p=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quadrant_labels(h: int, w: int) -> torch.Tensor:
    """(1, 4, h, w) one-hot map: channel q is 1 on quadrant q (TL, TR, BL, BR)."""
    labels = torch.zeros(1, 4, h, w)
    for q, (rows, cols) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        labels[0, q, rows * h // 2 : (rows + 1) * h // 2, cols * w // 2 : (cols + 1) * w // 2] = 1
    return labels


def test_label_crop_by_roi_align_selects_quadrant():
    # 64x128 image, 4x8 label map: the label box is the image box scaled by 1/16
    images = torch.arange(128.0).expand(2, 3, 64, 128)
    labels = quadrant_labels(4, 8).expand(2, -1, -1, -1)
    boxes = torch.tensor([[64.0, 32.0, 128.0, 64.0], [0.0, 0.0, 64.0, 32.0]])  # BR and TL quadrants
    out_images, out_labels = crop_and_flip(images, labels, boxes, (16, 32), (2, 4), NO_FLIP, gen())
    assert torch.equal(out_labels[0], torch.tensor([0.0, 0, 0, 1])[:, None, None].expand(4, 2, 4))
    assert torch.equal(out_labels[1], torch.tensor([1.0, 0, 0, 0])[:, None, None].expand(4, 2, 4))
    # image box x 64..128 into 32 bins of width 2: bin j centred on 65 + 2j -> value 64.5 + 2j
    assert torch.equal(out_images[0, :, :, :], (64.5 + 2 * torch.arange(32.0)).expand(3, 16, 32))


def test_flip_is_shared_by_image_and_label():
    ramp = torch.arange(8.0).expand(16, 3, 8, 8)
    labels = torch.arange(8.0).expand(16, 2, 8, 8)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]]).expand(16, 4)
    out_images, out_labels = crop_and_flip(ramp, labels, boxes, (8, 8), (8, 8), AugmentConfig(), gen(1))
    image_flipped = out_images[:, 0, 0, 0] == 7
    label_flipped = out_labels[:, 0, 0, 0] == 7
    assert torch.equal(image_flipped, label_flipped)
    assert 0 < int(image_flipped.sum()) < 16
    for images, expected in ((out_images, ramp), (out_labels, labels)):
        assert torch.equal(images, torch.where(image_flipped[:, None, None, None], expected.flip(-1), expected))


def test_random_crop_boxes():
    cfg = AugmentConfig()
    boxes = random_crop_boxes(64, 100, 200, cfg, gen())
    assert boxes.shape == (64, 4)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    scales = torch.tensor(cfg.crop_scales)
    assert torch.isclose((widths / 200)[:, None], scales).any(1).all()
    torch.testing.assert_close(heights / widths, torch.full((64,), 0.5))
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 100).all()


def test_crop_and_flip_shapes():
    images, labels = torch.rand(2, 3, 320, 320), torch.rand(2, 27, 40, 40)
    boxes = random_crop_boxes(2, 320, 320, AugmentConfig(), gen())
    out_images, out_labels = crop_and_flip(images, labels, boxes, (160, 160), (20, 20), AugmentConfig(), gen())
    assert out_images.shape == (2, 3, 160, 160) and out_labels.shape == (2, 27, 20, 20)


@pytest.mark.parametrize("per_batch", [True, False])
def test_photometric_per_batch_draws(per_batch):
    cfg = AugmentConfig(jitter_p=1.0, blur_p=1.0, grayscale_p=0.0, per_batch=per_batch)
    images = torch.rand(1, 3, 16, 16, generator=gen(5)).expand(8, -1, -1, -1)
    out = photometric(images, cfg, gen())
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    same = [torch.equal(out[0], out[i]) for i in range(1, 8)]
    assert all(same) if per_batch else not any(same)


def test_photometric_grayscale_and_identity():
    red = torch.zeros(2, 3, 4, 4)
    red[:, 0] = 1
    gray = photometric(red, AugmentConfig(jitter_p=0.0, grayscale_p=1.0, blur_p=0.0), gen())
    torch.testing.assert_close(gray, torch.full_like(red, 0.2989))  # ITU-R 601 red weight
    assert torch.equal(photometric(red, AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0), gen()), red)


def test_photometric_is_reproducible():
    images = torch.rand(4, 3, 16, 16, generator=gen(2))
    first, second = (photometric(images, AugmentConfig(), gen(3)) for _ in range(2))
    torch.testing.assert_close(first, second)
