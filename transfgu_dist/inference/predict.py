"""Predict stage: segment any images (a folder, an s3:// prefix or a list file of URIs) with a trained Segmenter.

Ray Data reads and resizes in CPU tasks (to the eval resolution, as evaluation does) and feeds an
actor pool of encoder + decoder (one GPU per actor where there are GPUs, bf16). Per image the actor writes, at the
image's ORIGINAL resolution, `labels/<id>.png` (8-bit: class ids through an evaluate run's Hungarian matching,
254 for unmatched clusters; raw cluster ids without a matching) and `overlays/<id>.png` (image | prediction with
a legend); with `probs`, also the per-pixel cluster probabilities (fp16, at the original resolution) of each batch
as one Parquet part `probs/part-<hash of its ids>.parquet` (read_probs). Every file is written atomically and the
label PNGs last, so a rerun skips the images whose label PNG exists; unreadable images are listed (their paths)
in `bad_images.txt` (and skipped on reruns), never fatal. With a Segmenter.sliding window the actor runs the
windows on each image at its original resolution instead of the resized batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from transfgu_dist.config import ResourcesConfig
from transfgu_dist.inference.segmenter import UNMATCHED, Segmenter, SlidingWindow, cluster_logits
from transfgu_dist.inference.viz import overlay_panel
from transfgu_dist.io import storage
from transfgu_dist.io.image_pool import actor_device, actor_pool, images_to_device, load_images
from transfgu_dist.io.images import BadImageError, decode_image
from transfgu_dist.io.storage_errors import StorageError
from transfgu_dist.method.crf import CRFConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LIST_SUFFIXES = (".txt", ".lst")


@dataclass
class PredictReport:
    images: int  # images with a label map in the output (this run and earlier ones)
    processed: int  # images segmented by this run
    bad: list[str]  # unreadable images
    seconds: float
    output: str

    def summary(self) -> str:
        rate = self.processed / self.seconds if self.seconds else 0.0
        return (
            f"predict: {self.processed} images segmented ({self.images} in the output, {len(self.bad)} "
            f"unreadable) in {self.seconds:.1f} s, {rate:.2f} images/s; labels and overlays under {self.output}"
        )


def list_inputs(uri: str) -> dict[str, str]:
    """image id (path below `uri` without its suffix, or a list file line's file stem) -> image URI."""
    if uri.endswith(LIST_SUFFIXES):
        lines = [ln.strip() for ln in storage.read_bytes(uri).decode().splitlines() if ln.strip()]
        items = {posixpath.splitext(posixpath.basename(ln))[0]: ln for ln in lines}
        if len(items) != len(lines):
            raise ValueError(f"{uri}: two listed images share a file name; list images with distinct names")
    else:
        base = uri.rstrip("/") + "/"
        items = {
            posixpath.splitext(f[len(base) :])[0]: f
            for f in storage.list_files(uri, IMAGE_SUFFIXES)
            if f.lower().endswith(IMAGE_SUFFIXES)
        }
    if not items:
        raise ValueError(
            f"{uri}: expected a folder / s3:// prefix holding images ({', '.join(IMAGE_SUFFIXES)}) or "
            f"a list file ({', '.join(LIST_SUFFIXES)}) of image URIs; found none"
        )
    return items


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def probs_part(probs: dict[str, np.ndarray]) -> bytes:
    """A Parquet part: one row per image (image_id, shape [K, H, W], probs: the flattened fp16 array)."""
    flat = [p.astype(np.float16).ravel() for p in probs.values()]
    offsets = np.cumsum([0] + [len(f) for f in flat]).astype(np.int64)
    table = pa.table(
        {
            "image_id": list(probs),
            "shape": [list(p.shape) for p in probs.values()],
            "probs": pa.LargeListArray.from_arrays(offsets, pa.array(np.concatenate(flat))),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_probs(output: str) -> dict[str, np.ndarray]:
    """image id -> its (K, H, W) fp16 probabilities from `output`/probs (one entry per id: a rerun after a crash
    may have written an image into two parts)."""
    out = {}
    for part in storage.list_files(storage.join(output, "probs"), (".parquet",)):
        table = pq.read_table(io.BytesIO(storage.read_bytes(part)))
        for row, (image_id, shape) in enumerate(zip(table["image_id"].to_pylist(), table["shape"].to_pylist())):
            out[image_id] = table["probs"][row].values.to_numpy().reshape(shape)
    return out


class PredictWriter:
    """Ray Data actor: segments a batch and writes each readable image's overlay, the batch's probabilities
    part (with `probs`), then the label PNGs."""

    def __init__(
        self,
        artifact: dict[str, Any],
        output: str,
        crf: CRFConfig | None = None,
        sliding: SlidingWindow | None = None,
        probs: bool = False,
    ):
        self.seg = Segmenter.from_artifact(artifact).to(actor_device())
        self.seg.crf, self.seg.sliding = crf, sliding
        self.output, self.probs, self.names = output, probs, self.seg.legend()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        grids = (
            [None] * len(batch["ok"])
            if self.seg.sliding
            else cluster_logits(
                self.seg.encoder, self.seg.decoder, images_to_device(batch, self.seg.device), self.seg.precision
            )
        )
        ok = batch["ok"].copy()
        labels, probs = {}, {}
        for i, (image_id, uri) in enumerate(zip(batch["image_id"], batch["uri"])):
            if not ok[i]:
                continue
            try:
                image = decode_image(storage.read_bytes(uri), uri)  # at its original size
            except (BadImageError, StorageError) as e:
                log.warning("skipping image: %s", e)
                ok[i] = False
                continue
            scores = self.seg.scores(image, grids[i])
            labels[image_id] = self.seg.labels(scores)
            if self.probs:
                probs[image_id] = self.seg.probabilities(scores).half().cpu().numpy()
            storage.write_bytes(
                storage.join(self.output, "overlays", f"{image_id}.png"),
                overlay_panel(image, None, labels[image_id], self.names),
            )
        if probs:
            digest = hashlib.sha1("\n".join(probs).encode()).hexdigest()[:16]
            storage.write_bytes(storage.join(self.output, "probs", f"part-{digest}.parquet"), probs_part(probs))
        for image_id, lab in labels.items():
            storage.write_bytes(storage.join(self.output, "labels", f"{image_id}.png"), png(lab))
        return {"image_id": batch["image_id"], "ok": ok}


def done_ids(output: str, items: dict[str, str]) -> tuple[set[str], set[str]]:
    """Images (ids of `items`, id -> URI) with a label PNG in `output`, and the ones an earlier run listed as
    unreadable in `bad_images.txt` (one URI a line)."""
    base = storage.join(output, "labels").rstrip("/") + "/"
    done = {posixpath.splitext(f[len(base) :])[0] for f in storage.list_files(base.rstrip("/"), (".png",))}
    listed = storage.join(output, "bad_images.txt")
    uris = set(storage.read_bytes(listed).decode().splitlines()) if storage.exists(listed) else set()
    return done, {i for i, u in items.items() if u in uris}


def run_predict(
    seg: Segmenter,
    inputs: str,
    output: str,
    batch_size: int = 16,
    probs: bool = False,
    resources: ResourcesConfig | None = None,
    progress: Callable[[Iterator[dict], int], Iterator[dict]] | None = None,
) -> PredictReport:
    """Segment every image under `inputs` not yet in `output` (see the module docstring); `probs` also writes the
    per-pixel probabilities; `progress(rows, n)` wraps the per-image result rows as they complete (a console
    display), and the legend of the label values is written as `names.json`. `resources`: the actor pool's
    (image_pool.actor_pool); None: one actor per GPU present, else one CPU actor."""
    start = time.perf_counter()
    items = list_inputs(inputs)
    done, bad = done_ids(output, items)
    pending = [(i, u) for i, u in items.items() if i not in done | bad]
    log.info(
        "predict: %d images, %d already done or unreadable, %d to segment",
        len(items),
        len(items) - len(pending),
        len(pending),
    )
    if pending:
        ds = ray.data.from_items([{"image_id": i, "uri": u} for i, u in pending])
        ds = ds.map_batches(
            load_images,
            fn_kwargs={"size": seg.image_size, "method": seg.resize},
            batch_size=batch_size,
            num_cpus=resources.decode_cpus if resources else 1,
        )
        legend = dict(enumerate(seg.legend()))
        if seg.matching is not None:
            legend[UNMATCHED] = "unmatched cluster"
        storage.write_bytes(storage.join(output, "names.json"), json.dumps(legend, indent=1).encode())
        writer = {"artifact": seg.artifact(), "output": output, "crf": seg.crf, "sliding": seg.sliding, "probs": probs}
        resources = resources or ResourcesConfig(actor_gpus=None)
        ds = ds.map_batches(PredictWriter, fn_constructor_kwargs=writer, batch_size=batch_size, **actor_pool(resources))
        rows = list((progress or (lambda r, n: r))(ds.iter_rows(), len(pending)))
        new_bad = {r["image_id"] for r in rows if not r["ok"]}
        if new_bad:
            bad |= new_bad
            listed = "\n".join(sorted(items[i] for i in bad))
            storage.write_bytes(storage.join(output, "bad_images.txt"), listed.encode())
            log.warning(
                "predict: %d unreadable images (listed in %s)", len(new_bad), storage.join(output, "bad_images.txt")
            )
    done, _ = done_ids(output, items)
    return PredictReport(
        len(done & items.keys()),
        len(pending) - len(bad & {i for i, _ in pending}),
        sorted(bad & items.keys()),
        time.perf_counter() - start,
        output,
    )
