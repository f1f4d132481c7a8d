"""What the image stages share: Ray start-up, image loading tasks, and the resumable per-image stage driver."""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import numpy as np
import ray
import torch

from transfgu_dist import parts, storage
from transfgu_dist.console import track
from transfgu_dist.contract import StageResult
from transfgu_dist.datasets import Sample
from transfgu_dist.images import BadImageError, decode_image, to_float_batch
from transfgu_dist.storage import StageOutput

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, verbose: bool = True) -> None:
    """Connect to the cluster (`address`, RAY_ADDRESS, or `ray job submit`'s) or start a local Ray in-process.
    verbose=False: workers' logs stay in Ray's log files (/tmp/ray/session_latest/logs), no Ray Data progress bars."""
    if not ray.is_initialized():
        keep_idle_workers()
        if not verbose:
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
            logging.getLogger("ray").setLevel(logging.WARNING)
        ray.init(address=address, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = verbose
        ctx.print_on_execution_start = verbose
    if not verbose:
        quiet_libraries()


def quiet_libraries() -> None:
    """Only warnings from Ray, Ray Data, MLflow and FAISS on the driver's console (their INFO lines stay in Ray's
    log files), no deprecation warnings from inside Ray, and no MLflow artifact progress bars."""
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "faiss"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled": ours show
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # logging the model: no download bar
    warnings.filterwarnings("ignore", module=r"ray\.")


def keep_idle_workers(seconds: int = 60) -> None:
    """For a Ray started by this process (ignored when joining a cluster): idle task workers live `seconds`, not
    Ray's 1 s, so each epoch's and stage's Ray Data tasks reuse warm processes instead of spawning and importing
    torch again (a second epoch's data: 10 s -> 0.3 s in a 12-image run on 2 cores)."""
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", str(seconds * 1000))


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def actor_pool() -> dict[str, Any]:
    """map_batches arguments of an encoder actor pool: one actor per GPU, or one CPU actor."""
    gpus = cluster_gpus()
    return {"compute": ray.data.ActorPoolStrategy(size=max(gpus, 1)), "num_gpus": 1 if gpus else 0, "num_cpus": 1}


def actor_device() -> torch.device:
    """An encoder actor's device: the GPU Ray gave it, else the CPU with every core of its node. On CPU the pool is
    one actor (actor_pool), and Ray's OMP_NUM_THREADS=1 for a num_cpus=1 actor would leave the other cores idle
    (docs/performance.md: extraction at 0.54 of the bare forward before, 0.91 after)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(os.cpu_count() or 1)
    return torch.device("cpu")


def load_images(batch: dict[str, np.ndarray], size: tuple[int, int], method: str = "antialias") -> dict[str, np.ndarray]:
    """Ray Data CPU task: read and decode images, resize to `size` (images.to_float_batch `method`); unreadable
    ones are flagged, not fatal."""
    images, ok = [], []
    for uri in batch["uri"]:
        try:
            img = decode_image(storage.read_bytes(uri), uri)
            images.append(to_float_batch(img, size, method)[0].mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy())
            ok.append(True)
        except (BadImageError, storage.StorageError) as e:
            log.warning("skipping image: %s", e)
            images.append(np.zeros((*size, 3), np.uint8))
            ok.append(False)
    return {**batch, "image": np.stack(images), "ok": np.array(ok)}


def images_to_device(batch: dict[str, np.ndarray], dev: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1] on `dev`."""
    return torch.from_numpy(batch["image"]).to(dev).permute(0, 3, 1, 2).float().div_(255)


def list_bad_images(out: StageOutput, bad: list[str], total: int) -> None:
    """`<out>/bad_images.txt`, one image id a line, and one warning, when some of the `total` images were skipped."""
    if bad:
        listed = storage.join(out.uri, "bad_images.txt")
        storage.write_bytes(listed, "\n".join(sorted(bad)).encode())
        log.warning("%s: skipped %d unreadable images of %d (listed in %s)", out.uri, len(bad), total, listed)


def image_result(stage: str, out: StageOutput, manifest: dict[str, Any], processed: int) -> StageResult:
    """An image stage's result: images covered by the committed output (`images`), processed by this run (the rest
    were committed already), and unreadable ones skipped (`bad_images`, listed in the manifest)."""
    return StageResult(stage, out.uri, manifest, processed, metrics={
        "images": manifest["images"], "processed": processed, "bad_images": len(manifest["bad_images"])})


def run_image_stage(stage: str, out: StageOutput, samples: list[Sample], size: tuple[int, int], actor: type,
                    actor_kwargs: dict[str, Any], images_per_task: int, images_per_part: int,
                    extra_manifest: dict[str, Any], resize: str = "antialias") -> StageResult:
    """Map `actor` over the images not yet covered by a committed part of `out` (resized to `size` by `resize`,
    images.to_float_batch), then commit `out`.

    Ray Data reads and decodes in CPU tasks and feeds an actor pool (one GPU per actor where the cluster has
    GPUs); each actor call gets `images_per_part` images (bundled from the `images_per_task` decode tasks) and
    writes one Parquet part, batching its encoder work internally. A rerun skips every image a published part
    covers, and each image is left in exactly one part before the commit (parts.deduplicate). The actor returns
    one row per part with its number of `images` (unreadable ones included), counted on the `stage`'s progress.
    """
    if out.is_committed():
        return image_result(stage, out, out.manifest(), 0)
    pending = parts.pending(samples, parts.coverage(out))
    log.info("%s: %d images, %d already done, %d to process", out.uri, len(samples), len(samples) - len(pending),
             len(pending))
    if pending:
        ds = ray.data.from_items([{"image_id": s.image_id, "uri": s.image} for s in pending])
        ds = ds.map_batches(load_images, fn_kwargs={"size": size, "method": resize}, batch_size=images_per_task,
                            num_cpus=1)
        ds = ds.map_batches(actor, fn_constructor_kwargs=actor_kwargs, batch_size=images_per_part, **actor_pool())
        for _ in track(ds.iter_rows(), stage, len(pending), lambda row: int(row["images"])):
            pass
    removed, cover = parts.deduplicate(out)
    if removed:
        log.warning("%s: %d parts overlapped others (images batched twice); removed or rewritten: %s", out.uri,
                    len(removed), ", ".join(removed))
    done, bad = parts.covered(cover)
    missing = parts.pending(samples, cover)
    if missing:
        raise RuntimeError(f"{out.uri}: {len(missing)} images were not processed, "
                           f"e.g. {[s.image_id for s in missing[:3]]}")
    list_bad_images(out, bad, len(samples))
    manifest = out.commit({"images": len(done), "bad_images": sorted(bad), "part_records": parts.records(out, cover),
                           **extra_manifest})
    return image_result(stage, out, manifest, len(pending))
