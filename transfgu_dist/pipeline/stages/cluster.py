"""Stage 2, cluster: FAISS k-means of the crop CLS features into K concepts, fg and bg pools apart (sec 3.2, 4.2)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
import torch

from transfgu_dist.config import Config
from transfgu_dist.io import parts
from transfgu_dist.io.concepts_file import write_concepts
from transfgu_dist.io.image_pool import cluster_gpus
from transfgu_dist.method.concepts import fit_concepts
from transfgu_dist.pipeline import contract, settings_guard
from transfgu_dist.pipeline.contract import StageResult


def _sample(is_fg: np.ndarray, caps: tuple[int | None, int | None], seed: int) -> np.ndarray:
    """Rows to keep: every row, except that a pool (fg, bg) with more rows than its cap keeps a uniform sample of
    `cap` of them."""
    keep = np.ones(len(is_fg), bool)
    rng = np.random.default_rng(seed)
    for pool, cap in zip((is_fg, ~is_fg), caps):
        rows = np.flatnonzero(pool)
        if cap is not None and len(rows) > cap:
            keep[rows] = False
            keep[rng.choice(rows, cap, replace=False)] = True
    return keep


def read_pools(
    uris: list[str], caps: tuple[int | None, int | None] = (None, None), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The fg and bg crop features of the given parts as float32 (n, d) arrays, in one streamed pass, each pool
    capped at a uniform sample of `caps` rows (None: all), so memory follows the caps, not the data set.

    Arrow decodes parts on its threads while this one widens each batch into a single buffer from Arrow's memory
    pool (a fresh numpy mapping's first touch costs more than the cast): fg rows fill it from the front, bg rows
    from the back, so bg comes in reverse batch order. The cast runs on one torch thread, as spinning OpenMP
    workers would take the cores Arrow decodes on (docs/performance.md). Caps cost one more pass over `is_fg`."""
    parquet = parts.dataset(uris)
    keep = None
    if caps != (None, None):
        keep = _sample(parquet.to_table(columns=["is_fg"]).column("is_fg").to_numpy(zero_copy_only=False), caps, seed)
    n, d = parquet.count_rows() if keep is None else int(keep.sum()), parquet.schema.field("feature").type.list_size
    out = np.frombuffer(pa.allocate_buffer(n * d * 4), np.float32).reshape(n, d)
    fg_end, bg_start, row = 0, n, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch in parquet.to_batches(columns=["is_fg", "feature"], fragment_readahead=16):
            is_fg = batch.column("is_fg").to_numpy(zero_copy_only=False)
            values = parts.list_values(batch.column("feature"))
            if keep is not None:  # Arrow yields batches in order, so the rows line up with the first pass's
                kept, row = keep[row : row + len(values)], row + len(values)
                is_fg, values = is_fg[kept], values[kept]
            fg, bg = torch.from_numpy(values[is_fg]), torch.from_numpy(values[~is_fg])
            torch.from_numpy(out[fg_end : fg_end + len(fg)]).copy_(fg)
            torch.from_numpy(out[bg_start - len(bg) : bg_start]).copy_(bg)
            fg_end, bg_start = fg_end + len(fg), bg_start - len(bg)
    finally:
        torch.set_num_threads(threads)
    return out[:fg_end], out[fg_end:]


def _fit(cfg: Config, uris: list[str]) -> dict:
    """Runs as a Ray task (on a GPU node with resources.cluster_gpu): reads only the two columns it needs."""
    c = cfg.cluster
    # FAISS would train on a sample of max_points_per_centroid per centroid anyway: read only that many
    caps = (
        (None, None)
        if c.max_points_per_centroid is None
        else (c.k_fg * c.max_points_per_centroid, c.k_bg * c.max_points_per_centroid)
    )
    fg, bg = read_pools(uris, caps, c.seed)
    concepts = fit_concepts(
        fg,
        bg if c.k_bg else None,
        c.k_fg,
        c.k_bg,
        niter=c.niter,
        seed=c.seed,
        max_points_per_centroid=c.max_points_per_centroid,
    )
    out = contract.output(cfg, "cluster")
    write_concepts(out, concepts)
    return out.commit(
        {
            "k_fg": c.k_fg,
            "k_bg": c.k_bg,
            "d": int(fg.shape[1]),
            "seed": c.seed,
            "niter": c.niter,
            "points_fg": len(fg),
            "points_bg": len(bg),
            "objective": concepts.objective,
            "settings": settings_guard.record(cfg, "cluster"),
        }
    )


def run_cluster(cfg: Config) -> StageResult:
    """Cluster the committed features; the result carries the concepts manifest and the points and k-means
    objective of each pool."""
    out = contract.output(cfg, "cluster")
    processed = 0
    if out.is_committed():
        manifest = out.manifest()
    else:
        uris = parts.part_uris(contract.output(cfg, "extract"))
        wants = cfg.resources.cluster_gpu
        gpus = int(cluster_gpus() > 0 if wants is None else wants)  # asked for: the autoscaler adds a GPU node
        manifest = ray.get(ray.remote(_fit).options(num_gpus=gpus, num_cpus=1).remote(cfg, uris))
        processed = manifest["points_fg"] + manifest["points_bg"]
    return StageResult(
        "cluster",
        out.uri,
        manifest,
        processed,
        metrics={
            "points_fg": manifest["points_fg"],
            "points_bg": manifest["points_bg"],
            **{f"objective_{k}": v for k, v in manifest["objective"].items()},
        },
    )
