"""Images into Ray Data and onto the device: decode-and-resize CPU tasks, and the encoder actor pool they feed."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import ray
import torch

from transfgu_dist.io import storage
from transfgu_dist.io.images import BadImageError, decode_image, model_batch, model_input
from transfgu_dist.io.storage_errors import StorageError

log = logging.getLogger(__name__)


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


def load_images(
    batch: dict[str, np.ndarray], size: tuple[int, int], method: str = "antialias"
) -> dict[str, np.ndarray]:
    """Ray Data CPU task: read and decode images, each preprocessed by images.model_input (`size`, `method`);
    unreadable ones are flagged, not fatal."""
    images, ok = [], []
    for uri in batch["uri"]:
        try:
            images.append(model_input(decode_image(storage.read_bytes(uri), uri), size, method))
            ok.append(True)
        except (BadImageError, StorageError) as e:
            log.warning("skipping image: %s", e)
            images.append(np.zeros((*size, 3), np.uint8))
            ok.append(False)
    return {**batch, "image": np.stack(images), "ok": np.array(ok)}


def images_to_device(batch: dict[str, np.ndarray], dev: torch.device) -> torch.Tensor:
    """A batch's images -> the float encoder input on `dev` (images.model_batch)."""
    return model_batch(batch["image"], dev)
