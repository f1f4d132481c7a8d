"""How each stage resizes images, crops and labels (`data.resize`: reference | antialias).

reference (the authors' crop, Grad-CAM, training and evaluation code):
- full images for cropping and Grad-CAM: OpenCV nearest-neighbour for COCO (torch `nearest` is OpenCV's
  INTER_NEAREST rule, src = floor(dst * in/out)), plain bilinear elsewhere;
- training and evaluation images, crops (extract) and training crops: plain bilinear, align_corners False,
  no antialiasing; crop boxes on whole pixels;
- ground-truth labels: `nearest`.
antialias (`paper` profile; this project's own choice): antialiased bilinear images, RoI-Align crops (adaptive
sampling, so downscaling averages), labels `nearest-exact`. Soft pseudo labels are RoI-Aligned in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transfgu_dist.config import DataConfig
from transfgu_dist.method.crops import cut_crops


@dataclass(frozen=True)
class Resizing:
    full: str  # full images before cropping / Grad-CAM: nearest | bilinear | antialias (images.to_float_batch)
    images: str  # training and evaluation images: bilinear | antialias
    crops: str  # crops of images: bilinear (plain resize of a whole-pixel box) | roi_align
    labels: str  # ground-truth labels: nearest | nearest-exact


ANTIALIAS = Resizing("antialias", "antialias", "roi_align", "nearest-exact")


def resizing(data: DataConfig) -> Resizing:
    if data.resize == "antialias":
        return ANTIALIAS
    return Resizing("nearest" if data.layout == "cocostuff" else "bilinear", "bilinear", "bilinear", "nearest")


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """Images as float in [0, 1]: uint8 divided by 255, float ones as they are."""
    return images.float().div(255) if images.dtype == torch.uint8 else images.float()


def resize_crops(
    images: torch.Tensor, rois: torch.Tensor, out_size: int | tuple[int, int], method: str
) -> torch.Tensor:
    """(n, C, *out_size) crops of images (B, C, H, W) at rois (n, 5) [batch_idx, x1, y1, x2, y2] (pixel edges).

    roi_align: crops.cut_crops. bilinear: the box rounded to whole pixels, sliced and resized by plain bilinear;
    boxes of one size are resized in one call.
    """
    if method == "roi_align":
        return cut_crops(images, rois, out_size)
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    r = rois.round().long().cpu()
    out = images.new_empty(len(r), images.shape[1], *size)
    sides = r[:, 3:5] - r[:, 1:3]
    for side in sides.unique(dim=0):
        idx = (sides == side).all(1).nonzero()[:, 0]
        crops = torch.stack([images[b, :, y1:y2, x1:x2] for b, x1, y1, x2, y2 in r[idx].tolist()])
        out[idx.to(out.device)] = F.interpolate(crops, size=size, mode="bilinear", align_corners=False)
    return out
