"""Stage 2, cluster: FAISS k-means of the crop CLS features into K concepts, fg and bg pools apart (sec 3.2, 4.2)."""
from __future__ import annotations

import io

import numpy as np
import ray

from transfgu_dist import parts, storage
from transfgu_dist.concepts import Concepts, fit_concepts
from transfgu_dist.config import Config
from transfgu_dist.datasets import inputs_root
from transfgu_dist.stages.common import cluster_gpus
from transfgu_dist.stages.extract import features_output
from transfgu_dist.storage import StageOutput

CONCEPTS = "concepts.npz"


def concepts_output(cfg: Config) -> StageOutput:
    return StageOutput(storage.join(inputs_root(cfg), "concepts"))


def load_concepts(cfg: Config) -> Concepts:
    out = concepts_output(cfg)
    with np.load(io.BytesIO(storage.read_bytes(out.part_uri(CONCEPTS)))) as arrays:
        return Concepts.from_arrays(dict(arrays))


def _fit(cfg: Config, uris: list[str]) -> dict:
    """Runs as a Ray task (on a GPU node when there is one): reads only the two columns it needs."""
    table = parts.read_table(uris, ["is_fg", "feature"])
    x = parts.column_array(table, "feature", dtype=np.float32)
    is_fg = table.column("is_fg").to_numpy(zero_copy_only=False)
    c = cfg.cluster
    concepts = fit_concepts(x[is_fg], x[~is_fg] if c.k_bg else None, c.k_fg, c.k_bg, niter=c.niter, seed=c.seed,
                            max_points_per_centroid=c.max_points_per_centroid)
    buf = io.BytesIO()
    np.savez(buf, **concepts.to_arrays())
    out = concepts_output(cfg)
    out.write_part(CONCEPTS, buf.getvalue())
    return out.commit({"k_fg": c.k_fg, "k_bg": c.k_bg, "d": int(x.shape[1]), "seed": c.seed, "niter": c.niter,
                       "points_fg": int(is_fg.sum()), "points_bg": int((~is_fg).sum()),
                       "objective": concepts.objective})


def run_cluster(cfg: Config) -> dict:
    """Cluster the committed features; returns the concepts manifest."""
    out = concepts_output(cfg)
    if out.is_committed():
        return out.manifest()
    uris = parts.part_uris(features_output(cfg))
    gpus = 1 if cluster_gpus() else 0
    return ray.get(ray.remote(_fit).options(num_gpus=gpus, num_cpus=1).remote(cfg, uris))
