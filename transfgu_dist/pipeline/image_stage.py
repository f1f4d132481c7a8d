"""The resumable per-image stage driver shared by extract and pseudo_label: pending images through an encoder actor
pool into Parquet parts, each image in exactly one part, then the commit."""

from __future__ import annotations

import logging
from typing import Any

import ray

from transfgu_dist.config import ResourcesConfig
from transfgu_dist.io import parts, storage
from transfgu_dist.io.datasets import Sample
from transfgu_dist.io.image_pool import actor_pool, load_images
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.pipeline.console import images_done
from transfgu_dist.pipeline.contract import StageResult
from transfgu_dist.pipeline.recovery import node_losses

log = logging.getLogger(__name__)


class ImagesDone:
    """In an image stage's actor: reports to the driver's progress queue (console.images_done; None: no report)
    how many images of the current call its encoder finished, as it finishes them."""

    def __init__(self, queue: Any = None):
        self.queue, self.n = queue, 0

    def upto(self, n: int) -> None:
        """The first `n` images of this call are done."""
        if self.queue is not None and n > self.n:
            try:
                self.queue.put_nowait(n - self.n)
            except Exception:  # noqa: BLE001 - progress is best effort: a lost queue never fails the stage
                self.queue = None
        self.n = max(self.n, n)

    def finish(self, n: int) -> None:
        """All `n` images of this call are done (unreadable ones included); the next call starts from 0."""
        self.upto(n)
        self.n = 0


def list_bad_images(out: StageOutput, bad: dict[str, str], total: int) -> None:
    """`<out>/bad_images.txt`, one `file path (URI)<TAB>reason` a line (`bad`: path -> reason), and one warning with
    their count, when some of the `total` images were skipped."""
    if bad:
        listed = storage.join(out.uri, "bad_images.txt")
        storage.write_bytes(listed, "\n".join(f"{i}\t{bad[i]}" for i in sorted(bad)).encode())
        log.warning("%s: skipped %d unreadable images of %d (listed in %s)", out.uri, len(bad), total, listed)


def image_result(stage: str, out: StageOutput, manifest: dict[str, Any], processed: int) -> StageResult:
    """An image stage's result: images covered by the committed output (`images`), processed by this run (the rest
    were committed already), and unreadable ones skipped (`bad_images`, listed in the manifest)."""
    return StageResult(
        stage,
        out.uri,
        manifest,
        processed,
        metrics={"images": manifest["images"], "processed": processed, "bad_images": len(manifest["bad_images"])},
    )


def run_image_stage(
    stage: str,
    out: StageOutput,
    samples: list[Sample],
    size: tuple[int, int],
    actor: type,
    actor_kwargs: dict[str, Any],
    images_per_task: int,
    images_per_part: int,
    extra_manifest: dict[str, Any],
    resources: ResourcesConfig,
    resize: str = "antialias",
    gone: dict[str, str] | None = None,
) -> StageResult:
    """Map `actor` over the images not yet covered by a committed part of `out` (resized to `size` by `resize`,
    images.to_float_batch), then commit `out`.

    Ray Data reads and decodes in CPU tasks and feeds an actor pool sized by `resources` (image_pool.actor_pool);
    a node lost mid-stage costs its calls in flight, retried on the other actors. Each actor call gets
    `images_per_part` images (bundled from the `images_per_task` decode tasks) and writes one Parquet part, batching
    its encoder work internally. A rerun skips every image a published part covers, and each image is left in
    exactly one part before the commit (parts.deduplicate). As its encoder finishes images the actor counts them on
    the `stage`'s progress (ImagesDone). `gone`: images an upstream stage covered that are no longer listed
    (id -> reason), recorded as bad ones.
    """
    if out.is_committed():
        return image_result(stage, out, out.manifest(), 0)
    pending = parts.pending(samples, parts.coverage(out))
    log.info(
        "%s: %d images, %d already done, %d to process",
        out.uri,
        len(samples),
        len(samples) - len(pending),
        len(pending),
    )
    lost = []
    if pending:
        ds = ray.data.from_items([{"image_id": s.image_id, "uri": s.image} for s in pending])
        ds = ds.map_batches(
            load_images,
            fn_kwargs={"size": size, "method": resize},
            batch_size=images_per_task,
            num_cpus=resources.decode_cpus,
        )
        with node_losses(stage) as lost, images_done(stage, len(pending)) as progress:
            kwargs = {**actor_kwargs, "progress": progress}
            ds = ds.map_batches(
                actor, fn_constructor_kwargs=kwargs, batch_size=images_per_part, **actor_pool(resources)
            )
            for _ in ds.iter_rows():
                pass
    removed, cover = parts.deduplicate(out)
    if lost:
        log.warning(
            "%s: finished in this job after losing %d node(s); %d part(s) written twice by retried calls removed",
            stage,
            len(lost),
            len(removed),
        )
    if removed:
        log.warning(
            "%s: %d parts overlapped others (images batched twice); removed or rewritten: %s",
            out.uri,
            len(removed),
            ", ".join(removed),
        )
    done, bad = parts.covered(cover)
    missing = parts.pending(samples, cover)
    if missing:
        raise RuntimeError(
            f"{out.uri}: {len(missing)} images were not processed, e.g. {[s.image_id for s in missing[:3]]}"
        )
    bad = {**(gone or {}), **parts.bad_reasons(out, cover)}
    uris = {s.image_id: s.image for s in samples}
    paths = {i: uris.get(i, i) for i in bad}  # an image gone from the listing keeps its id
    listed = {paths[i]: reason.removeprefix(f"{paths[i]}: ") for i, reason in bad.items()}
    list_bad_images(out, listed, len(samples) + len(gone or {}))
    manifest = out.commit(
        {"images": len(done), "bad_images": sorted(bad), "part_records": parts.records(out, cover), **extra_manifest}
    )
    return image_result(stage, out, manifest, len(pending))
