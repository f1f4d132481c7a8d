"""Benchmarks of the hot paths, each measured against its ceiling on the same hardware.

Every sub-benchmark returns one JSON-ready dict with the same top-level keys (BENCH_KEYS): the device, library
versions, the sizes it ran at, the raw timings (every run and the median), the derived rates and ratios, the
headline `ratio` with its `target`, and the peak memory while it ran. Nothing here asserts on time: the numbers
are reported, and `meets_target` only says how the headline compares with its `target`.

    extract       crops/s of the whole Ray Data extraction (pipeline.stages.extract.run_extract) / bare encoder forward
    pseudo_label  batched Grad-CAM (one forward + one batched backward) / one forward + one backward, K = 27, 171
    cluster       FAISS k-means vs its distance-GEMM ceiling; Parquet feature read (parts.*) / raw pyarrow read
    bootstrap     Ray Train samples/s with 1 and 2 workers / the bare training step in-process

Steady-state rates of the Ray stages come from the modification times of what the stage publishes (one Parquet
part per actor call, one round checkpoint per round), so Ray start-up, actor construction and the first batch
are excluded; the end-to-end wall time and its rate are reported next to them.

Modules of benchmarks/: env (devices, timing, the local Ray, shared helpers), memory (PeakMemory), encoder
(extract, pseudo_label), cluster, bootstrap; the other modes of jobs/bench.py are device (--device-only), scale
(--size scale) and backbones (--size backbones).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bootstrap import BootstrapSize, bench_bootstrap
from benchmarks.cluster import ClusterSize, bench_cluster
from benchmarks.encoder import ExtractSize, PseudoSize, bench_extract, bench_pseudo_label
from benchmarks.env import device_name, ensure_ray, loadavg, versions

BENCHMARKS = ("extract", "pseudo_label", "cluster", "bootstrap")
BENCH_KEYS = (
    "device",
    "versions",
    "sizes",
    "timings",
    "rates",
    "ratios",
    "ratio",
    "target",
    "meets_target",
    "memory",
    "notes",
)
SCHEMA = "transfgu-dist-bench/1"


@dataclass(frozen=True)
class BenchSize:
    name: str
    extract: ExtractSize
    pseudo_label: PseudoSize
    cluster: ClusterSize
    bootstrap: BootstrapSize
    repeats: int  # timed repeats of every in-process measurement (median reported)


SIZES: dict[str, BenchSize] = {
    # seconds on 2 CPU cores (plus Ray start-up): checks that everything runs and the JSON is complete
    "tiny": BenchSize(
        "tiny",
        ExtractSize("vit_tiny_test", images=6, image_size=64, crop_size=32, batch_size=64, images_per_task=2),
        PseudoSize("vit_tiny_test", batch_size=4, image_size=64),
        ClusterSize(points=8_000, niter=4, parquet_rows=4_000, rows_per_part=500),
        BootstrapSize("vit_tiny_test", images=8, image_size=64, batch_size=4, epochs=1, k=8),
        repeats=3,
    ),
    # minutes on 2 CPU cores: the real ViT-S/8 at the synthetic preset's image sizes
    "small": BenchSize(
        "small",
        ExtractSize("vit_small_patch8", images=8, image_size=128, crop_size=64, batch_size=64, images_per_task=2),
        PseudoSize("vit_small_patch8", batch_size=8, image_size=128),
        ClusterSize(points=200_000, niter=20, parquet_rows=200_000, rows_per_part=560),
        BootstrapSize("vit_small_patch8", images=64, image_size=128, batch_size=16, epochs=2, k=27),
        repeats=5,
    ),
    # the paper's sizes (COCO-Stuff): meant for a GPU node; k-means on 1M points also runs on CPU in minutes
    "full": BenchSize(
        "full",
        ExtractSize("vit_small_patch8", images=64, image_size=640, crop_size=320, batch_size=64, images_per_task=4),
        PseudoSize("vit_small_patch8", batch_size=8, image_size=320),
        ClusterSize(points=1_000_000, niter=100, parquet_rows=1_000_000, rows_per_part=560),
        BootstrapSize("vit_small_patch8", images=256, image_size=320, batch_size=16, epochs=2, k=27),
        repeats=3,
    ),
}


def run(
    only: Sequence[str] = BENCHMARKS,
    size: str = "small",
    repeats: int | None = None,
    workdir: str | Path | None = None,
    address: str | None = None,
    log: Callable[[str], None] | None = None,
    worker_threads: int | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Run the chosen sub-benchmarks at `size` ('tiny', 'small', 'full'); returns the JSON document.

    A sub-benchmark that fails is recorded as {"error": ...} and the others still run; with `out`, the document
    is rewritten there after every sub-benchmark, so a long run keeps what it measured.
    """
    unknown = [b for b in only if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    if size not in SIZES:
        raise ValueError(f"unknown size '{size}' (known: {', '.join(SIZES)})")
    spec = SIZES[size]
    reps = repeats or spec.repeats
    log = log or (lambda msg: None)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "size": size,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "versions": versions(),
        "cpu_count": os.cpu_count(),
        "repeats": reps,
        "load_average": loadavg(),
        "worker_threads": worker_threads or "ray default (OMP_NUM_THREADS = the task's CPUs)",
        "benchmarks": {},
    }

    def save() -> None:
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(doc, indent=2) + "\n")

    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        work.mkdir(parents=True, exist_ok=True)
        if any(b in only for b in ("extract", "bootstrap")):
            ensure_ray(address, worker_threads)
        for name in BENCHMARKS:
            if name not in only:
                continue
            log(f"bench {name} ({size}) ...")
            start, load_start = time.perf_counter(), loadavg()
            try:
                if name == "extract":
                    result = bench_extract(spec.extract, work, reps)
                elif name == "pseudo_label":
                    result = bench_pseudo_label(spec.pseudo_label, reps)
                elif name == "cluster":
                    result = bench_cluster(spec.cluster, work, reps)
                else:
                    result = bench_bootstrap(spec.bootstrap, work, reps)
            except Exception as e:  # noqa: BLE001 - report it and go on with the other sub-benchmarks
                result = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
            result["bench_wall_s"] = round(time.perf_counter() - start, 2)
            result["load_average"] = {"start": load_start, "end": loadavg()}
            doc["benchmarks"][name] = result
            save()
            if "error" in result:
                log(f"bench {name}: FAILED after {result['bench_wall_s']} s: {result['error'][:500]}")
            else:
                log(f"bench {name}: ratio {result['ratio']} (target {result['target']}) in {result['bench_wall_s']} s")
    return doc


def failed(doc: dict[str, Any]) -> list[str]:
    """Names of the sub-benchmarks of `doc` that raised."""
    return [name for name, result in doc["benchmarks"].items() if "error" in result]
