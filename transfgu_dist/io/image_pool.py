"""Images into Ray Data and onto the device: decode-and-resize CPU tasks, and the encoder actor pool they feed."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import ray
import torch

from transfgu_dist.config import ResourcesConfig
from transfgu_dist.io import storage
from transfgu_dist.io.images import BadImageError, decode_image, model_batch, model_input
from transfgu_dist.io.storage_errors import StorageError

log = logging.getLogger(__name__)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def actor_pool(resources: ResourcesConfig) -> dict[str, Any]:
    """map_batches arguments of an encoder actor pool: `actor_gpus` GPUs per actor, pool_min to pool_max actors
    (Ray Data adds actors while work is queued, and the pending GPU requests make the autoscaler add nodes).
    actor_gpus None: one actor per GPU the cluster has now, or one CPU actor when it has none. An actor lost with its
    node is restarted and its calls retried on the others: Ray Data gives pool actors max_restarts=-1 and
    max_task_retries=-1 unless told otherwise (map_batches ray_remote_args are deprecated, gone in Ray 2.64)."""
    gpus = resources.actor_gpus
    if gpus is None:
        present = cluster_gpus()
        gpus, size = (1.0, {"size": present}) if present else (0.0, {"size": 1})
    else:
        size = {"min_size": resources.pool_min, "max_size": resources.pool_max}
    return {
        "compute": ray.data.ActorPoolStrategy(**size),
        "num_gpus": gpus,
        "num_cpus": 1,
    }


def actor_device() -> torch.device:
    """An encoder actor's device: the GPU Ray gave it, else the CPU with every core of its node. On CPU the pool is
    one actor (actor_pool), and Ray's OMP_NUM_THREADS=1 for a num_cpus=1 actor would leave the other cores idle
    (docs/performance.md: extraction at 0.54 of the bare forward before, 0.91 after)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(os.cpu_count() or 1)
    return torch.device("cpu")


def load_images(
    batch: dict[str, np.ndarray], size: tuple[int, int], method: str = "antialias"
) -> dict[str, np.ndarray]:
    """Ray Data CPU task: read and decode images, each preprocessed by images.model_input (`size`, `method`:
    uint8 for nearest, float32 in [0, 1] otherwise); unreadable ones are flagged (`ok` False, the reason in `error`),
    not fatal."""
    images, ok, errors = [], [], []
    dtype = np.uint8 if method == "nearest" else np.float32
    for uri in batch["uri"]:
        try:
            images.append(model_input(decode_image(storage.read_bytes(uri), uri), size, method))
            ok.append(True)
            errors.append("")
        except (BadImageError, StorageError) as e:
            log.warning("skipping image: %s", e)
            images.append(np.zeros((*size, 3), dtype))
            ok.append(False)
            errors.append(" ".join(str(e).split()))
    stacked = np.stack(images) if images else np.zeros((0, *size, 3), dtype)
    return {**batch, "image": stacked, "ok": np.array(ok, dtype=bool), "error": np.array(errors, dtype=object)}


def images_to_device(batch: dict[str, np.ndarray], dev: torch.device) -> torch.Tensor:
    """A batch's images -> the float encoder input on `dev` (images.model_batch)."""
    return model_batch(batch["image"], dev)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """load_images' images as uint8 (for pictures)."""
    return images if images.dtype == np.uint8 else (images * 255).round().astype(np.uint8)
