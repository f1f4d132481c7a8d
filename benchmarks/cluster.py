"""The `cluster` benchmark: FAISS k-means against its distance-GEMM ceiling, and the cluster stage's Parquet
feature read against a raw pyarrow read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.env import bench_result, measure, measure_interleaved, sig, torch_module
from benchmarks.memory import PeakMemory

FEATURE_DIM = 384  # the CLS width of the ViT-S encoders whose features are clustered (N x 384)


@dataclass(frozen=True)
class ClusterSize:
    points: int
    niter: int
    parquet_rows: int
    rows_per_part: int  # ~ images_per_task x kept crops per image, as the extract stage writes them
    ks: tuple[int, ...] = (27, 171)


def clustered_features(n: int, d: int = FEATURE_DIM, centers: int = 64, seed: int = 0) -> np.ndarray:
    """(n, d) float32 Gaussian blobs around `centers` random centres (k-means cost does not depend on the data,
    but blobs keep the assignment realistic)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d), dtype=np.float32) * 2
    x = rng.standard_normal((n, d), dtype=np.float32)
    x += c[rng.integers(0, centers, n)]
    return x


def write_feature_parts(out_uri: str, x: np.ndarray, rows_per_part: int) -> list[str]:
    """The extract stage's Parquet parts (same schema, float16 features, zstd) holding the rows of `x`."""
    import pyarrow as pa

    from transfgu_dist.io import parts
    from transfgu_dist.io.stage_output import StageOutput

    out = StageOutput(out_uri)
    rng = np.random.default_rng(1)
    names = []
    for i, start in enumerate(range(0, len(x), rows_per_part)):
        rows = x[start : start + rows_per_part]
        n = len(rows)
        table = pa.table(
            {
                "image_id": pa.array([f"{i:08d}"] * n, pa.string()),
                "beta": pa.array(rng.choice([0.5, 0.4, 0.3, 0.2], n).astype(np.float32)),
                "box": parts.fixed_list(rng.integers(0, 640, (n, 4), dtype=np.int32), pa.int32()),
                "fg_fraction": pa.array(rng.random(n, dtype=np.float32)),
                "is_fg": pa.array(rng.random(n) < 0.5),
                "feature": parts.fixed_list(rows.astype(np.float16), pa.float16()),
            }
        )
        names.append(parts.write_part(out, table, [f"{i:08d}"], []))
    return [out.part_uri(name) for name in names]


def bench_cluster(size: ClusterSize, workdir: Path, repeats: int) -> dict[str, Any]:
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    torch = torch_module()
    from transfgu_dist.io import parts
    from transfgu_dist.method.concepts import kmeans
    from transfgu_dist.pipeline.stages.cluster import read_pools

    timings, rates, ratios, memory = {}, {}, {}, {}
    x = clustered_features(size.points)
    use_gpu = faiss.get_num_gpus() > 0
    gemm_dev = torch.device("cuda" if use_gpu else "cpu")
    xt = torch.from_numpy(x).to(gemm_dev)
    km_repeats = max(1, repeats - 1) if size.points * size.niter > 10**7 else repeats
    for k in size.ks:
        with PeakMemory() as mem:
            timings[f"kmeans_k{k}"] = measure(
                lambda k=k, x=x: kmeans(x, k, niter=size.niter, seed=1), km_repeats, warmup=0
            )
        memory[f"kmeans_k{k}"] = mem.result
        c = xt[:k].clone()
        # the ceiling of one Lloyd iteration: the N x K x D distance GEMM
        timings[f"gemm_k{k}"] = measure(lambda c=c, xt=xt: torch.mm(xt, c.T), repeats)
        t = timings[f"kmeans_k{k}"]["median_s"]
        rates[f"kmeans_iterations_per_s_k{k}"] = sig(size.niter / t)
        rates[f"kmeans_gflops_k{k}"] = sig(2 * size.points * k * FEATURE_DIM * size.niter / t / 1e9)
        rates[f"gemm_gflops_k{k}"] = sig(2 * size.points * k * FEATURE_DIM / timings[f"gemm_k{k}"]["median_s"] / 1e9)
        ratios[f"kmeans_vs_gemm_ceiling_k{k}"] = size.niter * timings[f"gemm_k{k}"]["median_s"] / t
    del xt

    # Parquet: the cluster stage's read (fg and bg pools as float32) vs a raw pyarrow read
    feats = x[: size.parquet_rows] if size.parquet_rows <= len(x) else clustered_features(size.parquet_rows)
    del x
    uris = write_feature_parts(str(workdir / "features_bench"), feats, size.rows_per_part)
    del feats
    columns = ["is_fg", "feature"]

    def stage_read() -> None:
        read_pools(uris)

    def raw_read() -> pa.Table:
        return pq.read_table(uris, columns=columns)

    with PeakMemory() as mem:
        stage_read()
    memory["parquet_stage_read"] = mem.result
    reads = measure_interleaved(
        {
            "parquet_stage_read": stage_read,
            "parquet_raw_read": raw_read,
            "parquet_stage_read_table_only": lambda: parts.read_table(uris, columns),
        },
        repeats,
    )
    timings.update(reads)
    mb = size.parquet_rows * FEATURE_DIM * 2 / 2**20
    for name in ("parquet_stage_read", "parquet_raw_read", "parquet_stage_read_table_only"):
        rates[f"{name}_rows_per_s"] = sig(size.parquet_rows / timings[name]["median_s"])
        rates[f"{name}_feature_mb_per_s"] = sig(mb / timings[name]["median_s"])
    ratios["parquet_stage_vs_raw"] = timings["parquet_raw_read"]["median_s"] / timings["parquet_stage_read"]["median_s"]
    ratios["parquet_read_table_vs_raw"] = (
        timings["parquet_raw_read"]["median_s"] / timings["parquet_stage_read_table_only"]["median_s"]
    )
    headline = ratios["parquet_stage_vs_raw"]
    notes = [
        "ratio = Parquet feature read rate of the cluster stage's path (stages.cluster.read_pools: "
        "fg and bg float32 arrays) / pq.read_table of the same files; kmeans_vs_gemm_ceiling = niter x one N x K x D "
        "GEMM (torch) / concepts.kmeans time (1.0 = every iteration at GEMM speed)",
        f"k-means on {'GPU' if use_gpu else 'CPU'} (faiss.get_num_gpus() = {faiss.get_num_gpus()})",
    ]
    group = pq.ParquetFile(uris[0]).metadata.row_group(0)
    encodings = next(
        group.column(i).encodings
        for i in range(group.num_columns)
        if group.column(i).path_in_schema.startswith("feature.")
    )
    sizes = {
        **dataclasses.asdict(size),
        "dim": FEATURE_DIM,
        "parquet_parts": len(uris),
        "parquet_feature_mb": round(mb, 1),
        "parquet_feature_encodings": list(encodings),
        "kmeans_repeats": km_repeats,
    }
    return bench_result(sizes, timings, rates, ratios, headline, ">= 0.9 (read)", headline >= 0.9, memory, notes)
