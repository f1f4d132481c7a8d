"""What evaluate computes without labels (`data.layout=folder`): the trained decoder's clusters over the training
images, their sizes and pixel shares at the eval size, and per cluster a contact sheet of the images it covers most
(the cluster highlighted), so a person can name the clusters (predict's and export's `names=`)."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import ray

from transfgu_dist.config import Config
from transfgu_dist.inference.segmenter import predict
from transfgu_dist.inference.viz import cluster_sheet_png
from transfgu_dist.io.datasets import Sample
from transfgu_dist.io.image_pool import actor_device, actor_pool, images_to_device, load_images, to_uint8
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.io.weights import build_encoder
from transfgu_dist.method.decoder import MaskTransformer
from transfgu_dist.method.resizing import resizing
from transfgu_dist.pipeline.console import track
from transfgu_dist.pipeline.image_stage import list_bad_images

log = logging.getLogger(__name__)


class ClusterCounter:
    """Ray Data actor: per batch, the pixels and images of each cluster at the eval size, and each readable image
    with its cluster map (the driver keeps the few a contact sheet shows)."""

    def __init__(self, cfg: Config, decoder: MaskTransformer):
        self.dev = actor_device()
        self.encoder = build_encoder(cfg.encoder).to(self.dev)
        self.decoder = decoder.to(self.dev).eval()
        self.size, self.k = tuple(cfg.eval.image_size), cfg.n_outputs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"]
        pred = predict(self.encoder, self.decoder, images_to_device(batch, self.dev), self.size).astype(np.uint8)
        counts = np.stack([np.bincount(p.ravel(), minlength=self.k) for p in pred])  # (B, K)
        return {
            "image_id": batch["image_id"],
            "uri": batch["uri"],
            "ok": ok,
            "error": batch["error"],
            "image": batch["image"],
            "pred": pred,
            "pixels": np.where(ok[:, None], counts, 0),
        }


def best_tiles(kept: dict[int, list], row: dict[str, Any], n: int) -> None:
    """Keep, per cluster, the `n` images where it covers the largest share: (share, uri, image, pred) lists."""
    if not row["ok"]:
        return
    shares = row["pixels"] / max(row["pixels"].sum(), 1)
    for k in np.flatnonzero(shares):
        tiles = kept.setdefault(int(k), [])
        tiles.append((float(shares[k]), str(row["uri"]), to_uint8(row["image"]), row["pred"]))
        tiles.sort(key=lambda t: -t[0])
        del tiles[n:]


def summarise_clusters(
    cfg: Config, out: StageOutput, checkpoint: str, decoder: MaskTransformer, samples: list[Sample]
) -> dict[str, Any]:
    """Write `metrics.json` (scored: false; per cluster its pixels, pixel share and images), `clusters/cluster-<k>.png`
    (contact sheets of up to `eval.n_overlays` images each) and `bad_images.txt`; returns the metrics."""
    ds = ray.data.from_items([{"image_id": s.image_id, "uri": s.image} for s in samples])
    ds = ds.map_batches(
        load_images,
        fn_kwargs={"size": tuple(cfg.eval.image_size), "method": resizing(cfg.data).images},
        batch_size=cfg.eval.batch_size,
        num_cpus=cfg.resources.decode_cpus,
    )
    ds = ds.map_batches(
        ClusterCounter,
        fn_constructor_kwargs={"cfg": cfg, "decoder": decoder},
        batch_size=cfg.eval.batch_size,
        **actor_pool(cfg.resources),
    )
    pixels, images, bad, kept = np.zeros(cfg.n_outputs, np.int64), np.zeros(cfg.n_outputs, np.int64), {}, {}
    for row in track(ds.iter_rows(), "evaluate", len(samples), lambda r: 1):
        if not row["ok"]:
            bad[str(row["uri"])] = str(row["error"])
            continue
        pixels += row["pixels"]
        images += row["pixels"] > 0
        best_tiles(kept, row, cfg.eval.n_overlays)
    if not images.any():
        raise RuntimeError(f"{cfg.data_root}: none of the {len(samples)} images could be read")
    shares = pixels / pixels.sum()
    metrics = {
        "scored": False,
        "reason": "no labels: not scored (cluster sizes and pixel shares at the eval size instead)",
        "clusters": [
            {"cluster": k, "pixels": int(pixels[k]), "pixel_share": float(shares[k]), "images": int(images[k])}
            for k in range(cfg.n_outputs)
        ],
        "n_images": len(samples) - len(bad),
        "n_bad_images": len(bad),
        "bad_images": sorted(bad),
        "checkpoint": checkpoint,
    }
    list_bad_images(out, bad, len(samples))
    out.write_part("metrics.json", json.dumps(metrics, indent=2).encode())
    for k, tiles in kept.items():
        title = f"cluster {k}: {100 * shares[k]:.1f}% of the pixels, in {images[k]} images"
        out.write_part(f"clusters/cluster-{k}.png", cluster_sheet_png(title, [(t[2], t[3] == k) for t in tiles]))
    log.info("evaluate: no labels, not scored; %d clusters used in %d images", (pixels > 0).sum(), metrics["n_images"])
    return metrics
