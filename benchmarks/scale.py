"""`jobs/bench.py --size scale`: the extract stage's own overheads as the image count grows.

A tiny random encoder on 64 px images keeps the model cheap, so what grows with N is the pipeline: Ray Data, the
crop actor's per-batch work, part publishing and the resume / commit bookkeeping. Per N: extract wall time,
images/s, parts written, _SUCCESS.json bytes, the resume bookkeeping (list + footers + pending list) on the
committed output with half its parts removed, and the driver's peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SCALE_NS = (500, 2000)
SCALE_IMAGES_PER_PART = 256  # the crops.images_per_part default


def scale_row(n: int, workdir: Path) -> dict[str, Any]:
    from benchmarks.env import bench_config, write_images
    from transfgu_dist.io import parts
    from transfgu_dist.io.datasets import list_samples
    from transfgu_dist.pipeline import contract
    from transfgu_dist.pipeline.stages.extract import run_extract

    write_images(workdir / "data", n, 64)
    cfg = bench_config(
        workdir,
        f"scale_{n}",
        [
            "encoder.arch=vit_tiny_test",
            "crops.image_size=[64, 64]",
            "crops.crop_size=32",
            f"data.synthetic_train={n}",
            f"data.limit={n}",
            f"crops.images_per_part={SCALE_IMAGES_PER_PART}",
        ],
    )
    start = time.perf_counter()
    run_extract(cfg)
    wall = time.perf_counter() - start
    out = contract.output(cfg, "extract")
    manifest_bytes = os.path.getsize(out.success_uri)
    names = sorted(out.manifest()["part_records"])
    # a resume of the same output with half its parts gone: what the driver does before the first image moves
    os.remove(out.success_uri)
    for name in names[: len(names) // 2]:
        os.remove(out.part_uri(name))
    samples = list_samples(cfg, cfg.data.train_split)
    start = time.perf_counter()
    todo = parts.pending(samples, parts.coverage(out))
    resume_s = time.perf_counter() - start
    return {
        "images": n,
        "extract_wall_s": round(wall, 2),
        "images_per_s": round(n / wall, 1),
        "parts": len(names),
        "manifest_bytes": manifest_bytes,
        "resume_bookkeeping_s": round(resume_s, 4),
        "resume_pending": len(todo),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_scale(ns: Sequence[int], workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks.env import device_name, ensure_ray

    ensure_ray()
    rows = []
    for n in ns:
        rows.append(scale_row(n, workdir))
        log(json.dumps(rows[-1]))
    return {"size": "scale", "device": device_name(), "loadavg": os.getloadavg(), "rows": rows}
