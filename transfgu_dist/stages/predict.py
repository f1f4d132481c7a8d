"""Predict stage: segment any images (a folder, an s3:// prefix or a list file of URIs) with a trained Segmenter.

Ray Data reads and resizes in CPU tasks (the eval resolution, as evaluation does: reference sec 7.1) and feeds an
actor pool of encoder + decoder (one GPU per actor where there are GPUs, bf16). Per image the actor writes, at the
image's ORIGINAL resolution, `labels/<id>.png` (8-bit: class ids through an evaluate run's Hungarian matching,
254 for unmatched clusters; raw cluster ids without a matching) and `overlays/<id>.png` (image | prediction with
a legend). Every file is written atomically and the label PNG last, so a rerun skips the images whose label PNG
exists; unreadable images are listed in `bad_images.txt` (and skipped on reruns), never fatal.
"""
from __future__ import annotations

import io
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from PIL import Image

from transfgu_dist import storage
from transfgu_dist.crf import CRFConfig
from transfgu_dist.images import BadImageError, decode_image
from transfgu_dist.segmenter import Segmenter, cluster_logits
from transfgu_dist.stages.common import actor_device, actor_pool, images_to_device, load_images
from transfgu_dist.viz import overlay_panel

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LIST_SUFFIXES = (".txt", ".lst")


@dataclass
class PredictReport:
    images: int          # images with a label map in the output (this run and earlier ones)
    processed: int       # images segmented by this run
    bad: list[str]       # unreadable images
    seconds: float
    output: str

    def summary(self) -> str:
        rate = self.processed / self.seconds if self.seconds else 0.0
        return (f"predict: {self.processed} images segmented ({self.images} in the output, {len(self.bad)} "
                f"unreadable) in {self.seconds:.1f} s, {rate:.2f} images/s; labels and overlays under {self.output}")


def list_inputs(uri: str) -> dict[str, str]:
    """image id (path below `uri` without its suffix, or a list file line's file stem) -> image URI."""
    if uri.endswith(LIST_SUFFIXES):
        lines = [ln.strip() for ln in storage.read_bytes(uri).decode().splitlines() if ln.strip()]
        items = {posixpath.splitext(posixpath.basename(ln))[0]: ln for ln in lines}
        if len(items) != len(lines):
            raise ValueError(f"{uri}: two listed images share a file name; list images with distinct names")
    else:
        base = uri.rstrip("/") + "/"
        items = {posixpath.splitext(f[len(base):])[0]: f for f in storage.list_files(uri, IMAGE_SUFFIXES)
                 if f.lower().endswith(IMAGE_SUFFIXES)}
    if not items:
        raise ValueError(f"{uri}: expected a folder / s3:// prefix holding images ({', '.join(IMAGE_SUFFIXES)}) or "
                         f"a list file ({', '.join(LIST_SUFFIXES)}) of image URIs; found none")
    return items


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class PredictWriter:
    """Ray Data actor: segments a batch and writes each readable image's overlay, then its label PNG."""

    def __init__(self, artifact: dict[str, Any], output: str, crf: CRFConfig | None = None):
        self.seg = Segmenter.from_artifact(artifact).to(actor_device())
        self.seg.crf = crf
        self.output = output
        n = self.seg.decoder.n_classes
        self.names = self.seg.class_names if self.seg.matching is not None else [f"cluster {k}" for k in range(n)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits = cluster_logits(self.seg.encoder, self.seg.decoder, images_to_device(batch, self.seg.device))
        ok = batch["ok"].copy()
        for i, (image_id, uri) in enumerate(zip(batch["image_id"], batch["uri"])):
            if not ok[i]:
                continue
            try:
                image = decode_image(storage.read_bytes(uri), uri)  # at its original size
            except (BadImageError, storage.StorageError) as e:
                log.warning("skipping image: %s", e)
                ok[i] = False
                continue
            labels = self.seg.labels(logits[i], image)
            storage.write_bytes(storage.join(self.output, "overlays", f"{image_id}.png"),
                                overlay_panel(image, None, labels, self.names))
            storage.write_bytes(storage.join(self.output, "labels", f"{image_id}.png"), png(labels))
        return {"image_id": batch["image_id"], "ok": ok}


def done_ids(output: str) -> tuple[set[str], set[str]]:
    """Images with a label PNG in `output`, and the ones an earlier run listed as unreadable."""
    base = storage.join(output, "labels").rstrip("/") + "/"
    done = {posixpath.splitext(f[len(base):])[0] for f in storage.list_files(base.rstrip("/"), (".png",))}
    listed = storage.join(output, "bad_images.txt")
    bad = set(storage.read_bytes(listed).decode().split()) if storage.exists(listed) else set()
    return done, bad


def run_predict(seg: Segmenter, inputs: str, output: str, batch_size: int = 16) -> PredictReport:
    """Segment every image under `inputs` not yet in `output` (see the module docstring)."""
    start = time.perf_counter()
    items = list_inputs(inputs)
    done, bad = done_ids(output)
    pending = [(i, u) for i, u in items.items() if i not in done | bad]
    log.info("predict: %d images, %d already done or unreadable, %d to segment", len(items),
             len(items) - len(pending), len(pending))
    if pending:
        ds = ray.data.from_items([{"image_id": i, "uri": u} for i, u in pending])
        ds = ds.map_batches(load_images, fn_kwargs={"size": seg.image_size}, batch_size=batch_size, num_cpus=1)
        ds = ds.map_batches(PredictWriter, fn_constructor_kwargs={"artifact": seg.artifact(), "output": output, "crf": seg.crf},
                            batch_size=batch_size, **actor_pool())
        rows = ds.take_all()
        new_bad = {r["image_id"] for r in rows if not r["ok"]}
        if new_bad:
            bad |= new_bad
            storage.write_bytes(storage.join(output, "bad_images.txt"), "\n".join(sorted(bad)).encode())
            log.warning("predict: %d unreadable images (listed in %s)", len(new_bad),
                        storage.join(output, "bad_images.txt"))
    done, _ = done_ids(output)
    return PredictReport(len(done & items.keys()), len(pending) - len(bad & {i for i, _ in pending}),
                         sorted(bad & items.keys()), time.perf_counter() - start, output)
