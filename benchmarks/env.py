"""What every benchmark shares: the device and library versions, device-synchronised timing, the private local
Ray, the scratch configs and images, and the one result layout (BENCH_KEYS of `benchmarks.suite`)."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def torch_module():
    import torch

    return torch


def device_name() -> str:
    """'cpu (<model>, N cores)' or 'cuda (<GPU name>)': the device the encoder stages run on."""
    torch = torch_module()
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu ({model}, {os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    import faiss
    import pyarrow
    import ray
    import timm

    torch = torch_module()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "faiss": faiss.__version__,
        "timm": timm.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": np.__version__,
        "torch_threads": str(torch.get_num_threads()),
    }


def torch_device():
    torch = torch_module()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    torch = torch_module()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None: unchanged)."""
    torch = torch_module()
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------ timing


def measure(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Wall time of `fn` (device-synchronised): every run and the median, in seconds."""
    for _ in range(warmup):
        fn()
    sync()
    runs = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - start)
    return {"median_s": statistics.median(runs), "runs_s": [round(r, 6) for r in runs]}


def measure_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Like `measure` for several functions, run in turn within each repeat, so that a ratio of two of them is
    not skewed by load that drifts over time (other jobs sharing the cores)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            runs[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(r), "runs_s": [round(x, 6) for x in r]} for name, r in runs.items()}


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the shared cores were (noisy figures are explained by them)."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def ensure_ray(address: str | None = None, worker_threads: int | None = None) -> None:
    """Join `address`, or start a private local Ray bound to 127.0.0.1 with every core of this machine.

    worker_threads: OMP_NUM_THREADS for the local Ray's workers (Ray otherwise sets it to each task's or actor's
    CPU count, 1 for the extract actor); an experiment knob to measure what a multi-threaded actor would give.
    """
    import ray

    if ray.is_initialized():
        return
    from transfgu_dist.pipeline.ray_setup import keep_idle_workers

    if worker_threads:
        os.environ["OMP_NUM_THREADS"] = str(worker_threads)
    keep_idle_workers()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        local_ray_on_loopback()
        for attempt in range(3):  # an overloaded machine can miss Ray's fixed 30 s raylet start-up wait
            try:
                ray.init(
                    address="local",
                    num_cpus=os.cpu_count(),
                    include_dashboard=False,
                    log_to_driver=False,
                    _node_ip_address="127.0.0.1",
                )
                break
            except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception on that time-out
                ray.shutdown()
                if attempt == 2 or "timed out during startup" not in str(e):
                    raise
    ray.data.DataContext.get_current().enable_progress_bars = False


def bench_config(workdir: Path, name: str, overrides: Sequence[str]):
    from transfgu_dist.config import load_config

    return load_config(
        overrides=[
            f"output={workdir / name}",
            f"data.root={workdir / 'data'}",
            "encoder.weights=random",
            "encoder.random_fallback=false",
            *overrides,
        ]
    )


def write_images(root: Path, n: int, size: int) -> None:
    from transfgu_dist.io import synthetic

    if not (root / "classes.txt").exists() or len(list((root / "images" / "train").glob("*.png"))) < n:
        synthetic.write_dataset(root, n, 0, size=(size, size), seed=0)


def steady_rate(files: list[Path], items: Callable[[Path], int]) -> tuple[float | None, int, float]:
    """Items per second between the first and the last published file (the first one's items excluded)."""
    files = sorted(files, key=lambda p: p.stat().st_mtime_ns)
    if len(files) < 2:
        return None, 0, 0.0
    span = (files[-1].stat().st_mtime_ns - files[0].stat().st_mtime_ns) / 1e9
    n = sum(items(p) for p in files[1:])
    return (n / span if span > 0 else None), n, span


def bench_result(
    sizes: dict,
    timings: dict,
    rates: dict,
    ratios: dict,
    ratio: float,
    target: str,
    meets: bool,
    memory: dict,
    notes: list[str],
) -> dict[str, Any]:
    return {
        "device": device_name(),
        "versions": versions(),
        "sizes": sizes,
        "timings": timings,
        "rates": rates,
        "ratios": {k: sig(v) for k, v in ratios.items() if v is not None},
        "ratio": sig(ratio),
        "target": target,
        "meets_target": bool(meets),
        "memory": memory,
        "notes": notes,
    }


def local_ray_on_loopback() -> None:
    """Make a local Ray bind to 127.0.0.1: Ray resolves `_node_ip_address="127.0.0.1"` to the machine's routable
    IP unless its cluster mode is off (the env var reaches every Ray process this driver starts)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
