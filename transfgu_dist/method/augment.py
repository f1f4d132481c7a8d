"""Training augmentation (paper sec 4.2 "Data Augmentation"; the authors' `Segmenter.data_augment`).

Photometric jitter / colour drop / blur on the full image, then a random square-scaled crop that
resizes the image and RoI-Aligns the soft pseudo label, then a shared horizontal flip. Tensors may
live on any device; every random draw comes from the explicit generator (on its own device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as F

from transfgu_dist.method.crops import cut_crops
from transfgu_dist.method.resizing import resize_crops


@dataclass
class AugmentConfig:
    """Augmentation strengths and probabilities (the authors' values).

    per_batch=True draws the photometric parameters once per batch, as the reference does; the
    default draws them per image. Crops and flips are always drawn per image.
    """

    jitter_p: float = 0.3
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    grayscale_p: float = 0.2
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (1.0, 2.0)
    blur_kernel: int = 3
    crop_scales: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    flip_p: float = 0.5
    crop_resize: str = "roi_align"  # image crops: roi_align | bilinear (whole-pixel box, plain resize: reference)
    per_batch: bool = False


def _uniform(u: float, low: float, high: float) -> float:
    return low + u * (high - low)


def _photometric_draw(images: torch.Tensor, u: list[float], order: list[int], cfg: AugmentConfig) -> torch.Tensor:
    """One parameter draw of ColorJitter (random op order) -> RandomGrayscale -> GaussianBlur."""
    jitter_u, b, c, s, h, gray_u, blur_u, sigma_u = u
    if jitter_u < cfg.jitter_p:
        ops = (
            (F.adjust_brightness, _uniform(b, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)),
            (F.adjust_contrast, _uniform(c, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)),
            (F.adjust_saturation, _uniform(s, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation)),
            (F.adjust_hue, _uniform(h, -cfg.hue, cfg.hue)),
        )
        for i in order:
            op, factor = ops[i]
            images = op(images, factor)
    if gray_u < cfg.grayscale_p:
        images = F.rgb_to_grayscale(images, num_output_channels=3)
    if blur_u < cfg.blur_p:
        sigma = _uniform(sigma_u, *cfg.blur_sigma)
        images = F.gaussian_blur(images, [cfg.blur_kernel] * 2, [sigma, sigma])
    return images


def photometric(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Colour jitter, colour drop and Gaussian blur of (B, 3, H, W) images in [0, 1] (sec 4.2)."""
    groups = [images] if cfg.per_batch else list(images.split(1))
    u = torch.rand(len(groups), 8, generator=gen, device=gen.device).tolist()
    orders = torch.rand(len(groups), 4, generator=gen, device=gen.device).argsort(1).tolist()
    return torch.cat([_photometric_draw(g, ui, oi, cfg) for g, ui, oi in zip(groups, u, orders)])


def random_crop_boxes(batch: int, height: int, width: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """(B, 4) float boxes [x1, y1, x2, y2]: an s*H x s*W window, s from cfg.crop_scales, uniform position."""
    scales = torch.tensor(cfg.crop_scales, device=gen.device)
    s = scales[torch.randint(len(scales), (batch,), generator=gen, device=gen.device)]
    full = torch.tensor([width, height], dtype=torch.float32, device=gen.device)
    size = s[:, None] * full
    corner = torch.rand(batch, 2, generator=gen, device=gen.device) * (full - size)
    return torch.cat([corner, corner + size], 1)


def crop_and_flip(
    images: torch.Tensor,
    soft_labels: torch.Tensor,
    boxes: torch.Tensor,
    image_out: tuple[int, int],
    label_out: tuple[int, int],
    cfg: AugmentConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop-resize images (B, 3, H, W) (cfg.crop_resize) and RoI-Align soft labels (B, K, h, w) with the same
    boxes, then flip.

    The label box is the image box scaled by (w/W, h/H) (sec 4.2: "crop and resize the pseudo label
    by RoI-Align"); each flipped image has its label flipped too.
    """
    n, _, height, width = images.shape
    h, w = soft_labels.shape[-2:]
    rois = torch.cat([torch.arange(n, device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1)
    if cfg.crop_resize == "bilinear":  # the reference crops whole pixels, offsets floored (0..avail-1); the label
        size = (rois[:, 3:] - rois[:, 1:3]).round()  # box follows the same box
        rois = torch.cat([rois[:, :3].floor(), rois[:, 1:3].floor() + size], 1)
    label_rois = rois * rois.new_tensor([1, w / width, h / height, w / width, h / height])
    images = resize_crops(images, rois, image_out, cfg.crop_resize)
    soft_labels = cut_crops(soft_labels, label_rois, label_out)
    flip = (torch.rand(n, generator=gen, device=gen.device) < cfg.flip_p)[:, None, None, None]
    flip = flip.to(images.device)
    return torch.where(flip, images.flip(-1), images), torch.where(flip, soft_labels.flip(-1), soft_labels)
