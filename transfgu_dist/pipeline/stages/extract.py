"""Stage 1, extract: sliding-window crops with the foreground prior, encoded by the frozen ViT (Eq. 3, sec 4.2).

Writes one Parquet row per kept crop: image_id, beta, box (x1, y1, x2, y2 in resized-image pixels),
fg_fraction, is_fg, feature (CLS token, fixed-size list of crops.feature_dtype). Crops are cut on the encoder's device
(batched, transfgu_dist.method.resizing) from the resized image:
shipping the crops themselves would move ~35x the bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from transfgu_dist.config import Config
from transfgu_dist.io import parts
from transfgu_dist.io.datasets import list_samples
from transfgu_dist.io.image_pool import actor_device, images_to_device
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.io.weights import build_encoder
from transfgu_dist.method.crops import (
    DROP,
    FG,
    classify_windows_batch,
    fg_fraction_batch,
    foreground_prior,
    sliding_windows,
    windows_to_boxes,
)
from transfgu_dist.method.encoder import normalize
from transfgu_dist.method.precision import autocast
from transfgu_dist.method.resizing import resize_crops, resizing
from transfgu_dist.pipeline import contract, settings_guard
from transfgu_dist.pipeline.contract import StageResult
from transfgu_dist.pipeline.image_stage import ImagesDone, run_image_stage


class CropEncoder:
    """Ray Data actor: a batch of resized images -> one Parquet part of crop CLS features."""

    def __init__(self, cfg: Config, out_uri: str, progress: Any = None):
        self.cfg, self.dev, self.out = cfg, actor_device(), StageOutput(out_uri)
        self.progress = ImagesDone(progress)
        self.crop_resize = resizing(cfg.data).crops
        self.encoder = build_encoder(cfg.encoder).to(self.dev)
        p = self.encoder.patch_size
        h, w = (s // p for s in cfg.crops.image_size)
        self.windows = sliding_windows(h, w, cfg.crops.betas, cfg.crops.window_rule)
        self.boxes = torch.as_tensor(windows_to_boxes(self.windows, p, cfg.crops.window_rule), dtype=torch.float32)
        self.betas = np.asarray(cfg.crops.betas, np.float32)[self.windows[:, 0]]
        side = cfg.crops.image_size[0] * cfg.crops.image_size[1]
        self.prior_chunk = max(1, cfg.crops.batch_size * cfg.crops.crop_size**2 // side)
        self.settings = settings_guard.part_metadata(cfg, "extract")

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"]
        ids = [str(i) for i in batch["image_id"][ok]]
        images = normalize(images_to_device({"image": batch["image"][ok]}, self.dev))
        crops_cfg = self.cfg.crops
        fg = None
        if crops_cfg.prior == "attention" and len(ids):
            # the prior's forwards in chunks of about one crop batch's tokens
            with autocast(self.dev, crops_cfg.precision):
                fg = torch.cat(
                    [
                        foreground_prior(self.encoder(x, with_patch=False).attn.float())
                        for x in images.split(self.prior_chunk)
                    ]
                )
        # every window of every image classified at once, on the device (one batched summed-area table)
        rule = {"rule": crops_cfg.window_rule, "patch_size": self.encoder.patch_size}
        kinds = classify_windows_batch(
            fg, self.windows, crops_cfg.prior if ids else "none", crops_cfg.fg_min, crops_cfg.bg_min, len(ids), **rule
        ).cpu()
        image_idx, win = torch.nonzero(kinds != DROP, as_tuple=True)
        frac = torch.ones(len(win)) if fg is None else fg_fraction_batch(fg, self.windows, **rule).cpu()[image_idx, win]
        boxes_t = torch.cat([image_idx[:, None].float(), self.boxes[win]], dim=1)
        dtype = getattr(torch, self.cfg.crops.feature_dtype)
        features = [np.zeros((0, self.encoder.dim), self.cfg.crops.feature_dtype)]
        for chunk in boxes_t.to(self.dev).split(crops_cfg.batch_size) if len(boxes_t) else ():  # () if all bad
            crops = resize_crops(images, chunk, crops_cfg.crop_size, self.crop_resize)
            with autocast(self.dev, crops_cfg.precision):
                features.append(self.encoder(crops, with_patch=False).cls.to(dtype).cpu().numpy())
            self.progress.upto(int(chunk[-1, 0]))  # the images before the last one of this chunk are done
        keep = win.numpy()
        table = pa.table(
            {
                "image_id": pa.array(np.asarray(ids, dtype=object)[image_idx.numpy()], pa.string()),
                "beta": pa.array(self.betas[keep], pa.float32()),
                "box": parts.fixed_list(self.boxes[keep].numpy().astype(np.int32), pa.int32()),
                "fg_fraction": pa.array(frac.numpy(), pa.float32()),
                "is_fg": pa.array((kinds[image_idx, win] == FG).numpy(), pa.bool_()),
                "feature": parts.fixed_list(np.concatenate(features), pa.from_numpy_dtype(features[0].dtype)),
            },
            metadata=self.settings,
        )
        bad = [str(i) for i in batch["image_id"][~ok]]
        name = parts.write_part(self.out, table, ids, bad, dict(zip(bad, batch["error"][~ok])))
        self.progress.finish(len(batch["image_id"]))
        return {
            "part": np.array([name]),
            "images": np.array([len(batch["image_id"])]),
            "crops": np.array([table.num_rows]),
        }


def run_extract(cfg: Config) -> StageResult:
    """Crop and encode every training image; resumable, committed when every image is covered."""
    out = contract.output(cfg, "extract")
    samples = list_samples(cfg, cfg.data.train_split)
    return run_image_stage(
        "extract",
        out,
        samples,
        cfg.crops.image_size,
        CropEncoder,
        {"cfg": cfg, "out_uri": out.uri},
        cfg.crops.images_per_task,
        cfg.crops.images_per_part,
        {
            "encoder": cfg.encoder.arch,
            "betas": list(cfg.crops.betas),
            "resize": cfg.data.resize,
            "settings": settings_guard.record(cfg, "extract"),
        },
        cfg.resources,
        resizing(cfg.data).full,
    )
