"""Benchmarks of the hot paths, each measured against its ceiling on the same hardware (issue 6).

Every sub-benchmark returns one JSON-ready dict with the same top-level keys (BENCH_KEYS): the device, library
versions, the sizes it ran at, the raw timings (every run and the median), the derived rates and ratios, the
headline `ratio` with its `target`, and the peak memory while it ran. Nothing here asserts on time: the numbers
are reported, and `meets_target` only says how the headline compares with the issue's target.

    extract       crops/s of the whole Ray Data extraction (stages.extract.run_extract) / bare encoder forward
    pseudo_label  batched Grad-CAM (one forward + one batched backward) / one forward + one backward, K = 27, 171
    cluster       FAISS k-means vs its distance-GEMM ceiling; Parquet feature read (parts.*) / raw pyarrow read
    bootstrap     Ray Train samples/s with 1 and 2 workers / the bare training step in-process

Steady-state rates of the Ray stages come from the modification times of what the stage publishes (one Parquet
part per actor call, one round checkpoint per round), so Ray start-up, actor construction and the first batch
are excluded; the end-to-end wall time and its rate are reported next to them.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import io
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCHMARKS = ("extract", "pseudo_label", "cluster", "bootstrap")
BENCH_KEYS = ("device", "versions", "sizes", "timings", "rates", "ratios", "ratio", "target", "meets_target",
              "memory", "notes")
SCHEMA = "transfgu-dist-bench/1"
FEATURE_DIM = 384  # the CLS width of the ViT-S encoders whose features are clustered (N x 384, issue 6)


# ------------------------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class ExtractSize:
    arch: str
    images: int
    image_size: int
    crop_size: int
    batch_size: int
    images_per_task: int


@dataclass(frozen=True)
class PseudoSize:
    arch: str
    batch_size: int
    image_size: int
    ks: tuple[int, ...] = (27, 171)


@dataclass(frozen=True)
class ClusterSize:
    points: int
    niter: int
    parquet_rows: int
    rows_per_part: int  # ~ images_per_task x kept crops per image, as the extract stage writes them
    ks: tuple[int, ...] = (27, 171)


@dataclass(frozen=True)
class BootstrapSize:
    arch: str
    images: int
    image_size: int
    batch_size: int
    epochs: int          # epochs of the timed round (round 1, with a teacher); round 0 runs one epoch
    k: int
    workers: tuple[int, ...] = (1, 2)


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
    "tiny": BenchSize("tiny",
                      ExtractSize("vit_tiny_test", images=6, image_size=64, crop_size=32, batch_size=64,
                                  images_per_task=2),
                      PseudoSize("vit_tiny_test", batch_size=4, image_size=64),
                      ClusterSize(points=8_000, niter=4, parquet_rows=4_000, rows_per_part=500),
                      BootstrapSize("vit_tiny_test", images=8, image_size=64, batch_size=4, epochs=1, k=8),
                      repeats=3),
    # minutes on 2 CPU cores: the real ViT-S/8 at the synthetic preset's image sizes
    "small": BenchSize("small",
                       ExtractSize("vit_small_patch8", images=8, image_size=128, crop_size=64, batch_size=64,
                                   images_per_task=2),
                       PseudoSize("vit_small_patch8", batch_size=8, image_size=128),
                       ClusterSize(points=200_000, niter=20, parquet_rows=200_000, rows_per_part=560),
                       BootstrapSize("vit_small_patch8", images=64, image_size=128, batch_size=16, epochs=2, k=27),
                       repeats=5),
    # the paper's sizes (COCO-Stuff): meant for a GPU node; k-means on 1M points also runs on CPU in minutes
    "full": BenchSize("full",
                      ExtractSize("vit_small_patch8", images=64, image_size=640, crop_size=320, batch_size=64,
                                  images_per_task=4),
                      PseudoSize("vit_small_patch8", batch_size=8, image_size=320),
                      ClusterSize(points=1_000_000, niter=100, parquet_rows=1_000_000, rows_per_part=560),
                      BootstrapSize("vit_small_patch8", images=256, image_size=320, batch_size=16, epochs=2, k=27),
                      repeats=3),
}


# ------------------------------------------------------------------------------------------------ environment


def _torch():
    import torch

    return torch


def device_name() -> str:
    """'cpu (<model>, N cores)' or 'cuda (<GPU name>)': the device the encoder stages run on."""
    torch = _torch()
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

    torch = _torch()
    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "faiss": faiss.__version__, "timm": timm.__version__, "pyarrow": pyarrow.__version__,
            "numpy": np.__version__, "torch_threads": str(torch.get_num_threads())}


def _dev():
    torch = _torch()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None: unchanged)."""
    torch = _torch()
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
    _sync()
    runs = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        _sync()
        runs.append(time.perf_counter() - start)
    return {"median_s": statistics.median(runs), "runs_s": [round(r, 6) for r in runs]}


def measure_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Like `measure` for several functions, run in turn within each repeat, so that a ratio of two of them is
    not skewed by load that drifts over time (other jobs sharing the cores)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync()
            runs[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(r), "runs_s": [round(x, 6) for x in r]} for name, r in runs.items()}


def _r(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


# ------------------------------------------------------------------------------------------------ memory


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _process_tree(root: int) -> list[int]:
    """`root` and all its descendants (a local Ray's GCS, raylet and workers descend from the driver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat:
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _rss(pid: int) -> int:
    statm = _read(f"/proc/{pid}/statm")
    return int(statm.split()[1]) * resource.getpagesize() if statm else 0


def _status_kb(key: str) -> int | None:
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


class PeakMemory:
    """Peak memory while the `with` body runs.

    driver_peak_rss_mb: this process's peak RSS (VmHWM, reset on entry through /proc/self/clear_refs; where that
    is not possible, getrusage's lifetime ru_maxrss). tree_peak_rss_mb: the largest sampled sum of RSS over this
    process and its descendants (a local Ray: GCS, raylet, workers, actors; shared pages are counted in every
    process that maps them), next to the sum on entry. largest_child_peak_rss_mb: the largest single descendant
    (e.g. the Ray Data actor running the encoder). cuda_*: torch's allocator peak in this process, and the
    sampled peak of device memory in use by all processes (Ray actors included).
    """

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.result: dict[str, Any] = {}
        self._stop = threading.Event()
        self._proc = os.path.isdir("/proc/self")

    def _sample(self) -> tuple[int, int, int]:
        pids = _process_tree(os.getpid())
        sizes = {pid: _rss(pid) for pid in pids}
        children = [v for pid, v in sizes.items() if pid != os.getpid()]
        return sum(sizes.values()), max(children, default=0), self._cuda_used()

    def _cuda_used(self) -> int:
        torch = _torch()
        if not torch.cuda.is_available():
            return 0
        free, total = torch.cuda.mem_get_info()
        return total - free

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._update(*self._sample())

    def _update(self, tree: int, child: int, cuda: int) -> None:
        self._tree_peak = max(self._tree_peak, tree)
        self._child_peak = max(self._child_peak, child)
        self._cuda_peak = max(self._cuda_peak, cuda)

    def __enter__(self) -> PeakMemory:
        torch = _torch()
        self._hwm_reset = False
        if self._proc:
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self._hwm_reset = True
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._tree_peak = self._child_peak = self._cuda_peak = 0
        if self._proc:
            self._tree_start, _, self._cuda_start = self._sample()
            self._update(*self._sample())
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        torch = _torch()
        mb = 1 << 20
        out: dict[str, Any] = {}
        if self._proc:
            self._stop.set()
            self._thread.join()
            self._update(*self._sample())
        hwm = _status_kb("VmHWM") if self._hwm_reset else None
        if hwm is not None:
            out["driver_peak_rss_mb"] = round(hwm / 1024, 1)
            out["driver_peak_method"] = "VmHWM reset on entry"
        else:
            out["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            out["driver_peak_method"] = "ru_maxrss (process lifetime)"
        if self._proc:
            out["tree_start_rss_mb"] = round(self._tree_start / mb, 1)
            out["tree_peak_rss_mb"] = round(self._tree_peak / mb, 1)
            out["largest_child_peak_rss_mb"] = round(self._child_peak / mb, 1)
        if torch.cuda.is_available():
            out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / mb, 1)
            if self._proc:
                out["cuda_device_peak_used_mb"] = round(self._cuda_peak / mb, 1)
                out["cuda_device_start_used_mb"] = round(self._cuda_start / mb, 1)
        self.result = out


# ------------------------------------------------------------------------------------------------ Ray


def _loadavg() -> list[float] | None:
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
    from transfgu_dist.stages.common import keep_idle_workers

    if worker_threads:
        os.environ["OMP_NUM_THREADS"] = str(worker_threads)
    keep_idle_workers()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        _local_ray_on_loopback()
        for attempt in range(3):  # an overloaded machine can miss Ray's fixed 30 s raylet start-up wait
            try:
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")
                break
            except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception on that time-out
                ray.shutdown()
                if attempt == 2 or "timed out during startup" not in str(e):
                    raise
    ray.data.DataContext.get_current().enable_progress_bars = False


def _config(workdir: Path, name: str, overrides: Sequence[str]):
    from transfgu_dist.config import load_config

    return load_config(overrides=[f"output={workdir / name}", f"data.root={workdir / 'data'}",
                                  "encoder.weights=random", "encoder.random_fallback=false", *overrides])


def _write_images(root: Path, n: int, size: int) -> None:
    from transfgu_dist import synthetic

    if not (root / "classes.txt").exists() or len(list((root / "images" / "train").glob("*.png"))) < n:
        synthetic.write_dataset(root, n, 0, size=(size, size), seed=0)


def _steady_rate(files: list[Path], items: Callable[[Path], int]) -> tuple[float | None, int, float]:
    """Items per second between the first and the last published file (the first one's items excluded)."""
    files = sorted(files, key=lambda p: p.stat().st_mtime_ns)
    if len(files) < 2:
        return None, 0, 0.0
    span = (files[-1].stat().st_mtime_ns - files[0].stat().st_mtime_ns) / 1e9
    n = sum(items(p) for p in files[1:])
    return (n / span if span > 0 else None), n, span


def _result(sizes: dict, timings: dict, rates: dict, ratios: dict, ratio: float, target: str, meets: bool,
            memory: dict, notes: list[str]) -> dict[str, Any]:
    return {"device": device_name(), "versions": versions(), "sizes": sizes, "timings": timings, "rates": rates,
            "ratios": {k: _r(v) for k, v in ratios.items() if v is not None}, "ratio": _r(ratio), "target": target,
            "meets_target": bool(meets), "memory": memory, "notes": notes}


# ------------------------------------------------------------------------------------------------ 1. extract


def encoder_flops(arch: str, side: int) -> int:
    """FLOPs of one `encoder(x, with_patch=False)` on a single side x side image (torch's flop counter)."""
    torch = _torch()
    from torch.utils.flop_counter import FlopCounterMode

    from transfgu_dist.config import EncoderConfig
    from transfgu_dist.encoder import build_encoder

    encoder = build_encoder(EncoderConfig(arch=arch, weights="random"))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder(torch.zeros(1, 3, side, side), with_patch=False)
    return int(counter.get_total_flops())


def bench_extract(size: ExtractSize, workdir: Path, repeats: int) -> dict[str, Any]:
    import pyarrow.parquet as pq

    torch = _torch()
    from transfgu_dist.encoder import build_encoder
    from transfgu_dist.segmenter import autocast
    from transfgu_dist.stages.extract import features_output, run_extract

    overrides = [f"encoder.arch={size.arch}", f"crops.image_size=[{size.image_size}, {size.image_size}]",
                 f"crops.crop_size={size.crop_size}", f"crops.batch_size={size.batch_size}",
                 f"crops.images_per_task={size.images_per_task}", f"crops.images_per_part={size.images_per_task}",
                 f"data.synthetic_train={size.images}",
                 f"data.limit={size.images}"]
    _write_images(workdir / "data", size.images, size.image_size)
    # warm-up: one part, so the timed run finds Ray's worker processes started and torch imported
    run_extract(_config(workdir, "extract_warmup", [*overrides[:-1], f"data.limit={size.images_per_task}"]))
    cfg = _config(workdir, "extract", overrides)

    # the ceiling: the bare encoder forward on the same device, crop size and batch size, measured before and
    # after the pipeline run (medians over both) so that drifting load on shared cores hits both alike
    dev = _dev()
    encoder = build_encoder(cfg.encoder).to(dev)
    crops_t = torch.randn(size.batch_size, 3, size.crop_size, size.crop_size, device=dev)

    def bare() -> None:
        with torch.no_grad(), autocast(dev):
            encoder(crops_t, with_patch=False)

    def bare_1_thread() -> None:
        with torch_threads(1):
            bare()

    fns = {"bare_forward_batch": bare}
    notes = []
    if dev.type == "cpu" and torch.get_num_threads() > 1:
        # what one Ray actor with num_cpus=1 gets: Ray sets its OMP_NUM_THREADS (torch threads) to 1
        fns["bare_forward_batch_1_thread"] = bare_1_thread
        notes.append("CPU: Ray gives the extract actor (num_cpus=1) OMP_NUM_THREADS=1 unless the environment sets "
                     "it; bare_crops_per_s uses all cores of this process, bare_crops_per_s_1_thread one")
    before = measure_interleaved(fns, repeats)
    with PeakMemory() as bare_mem:
        bare()
    with PeakMemory() as mem:
        start = time.perf_counter()
        report = run_extract(cfg)
        wall = time.perf_counter() - start
    after = measure_interleaved(fns, repeats, warmup=0)
    part_files = sorted(Path(features_output(cfg).uri).glob("part-*.parquet"))
    crops = sum(pq.read_metadata(p).num_rows for p in part_files)
    steady, steady_crops, span = _steady_rate(part_files, lambda p: pq.read_metadata(p).num_rows)
    timings = {"pipeline_wall": {"median_s": round(wall, 4), "runs_s": [round(wall, 4)]},
               "pipeline_steady_span": {"median_s": round(span, 4), "runs_s": [round(span, 4)]}}
    for name in fns:
        runs = before[name]["runs_s"] + after[name]["runs_s"]
        timings[name] = {"median_s": statistics.median(runs), "runs_s": runs}
    bare_rate = size.batch_size / timings["bare_forward_batch"]["median_s"]
    rates = {"pipeline_crops_per_s": _r(crops / wall), "bare_crops_per_s": _r(bare_rate),
             "pipeline_steady_crops_per_s": _r(steady) if steady else None}
    bare1_rate = None
    if "bare_forward_batch_1_thread" in timings:
        bare1_rate = size.batch_size / timings["bare_forward_batch_1_thread"]["median_s"]
        rates["bare_crops_per_s_1_thread"] = _r(bare1_rate)
    # the fg-prior forward of every full image, as a fraction of the crop forwards' FLOPs
    flops_image, flops_crop = encoder_flops(size.arch, size.image_size), encoder_flops(size.arch, size.crop_size)
    prior_fraction = report.processed * flops_image / max(crops * flops_crop, 1)
    headline = (steady or crops / wall) / bare_rate
    ratios = {"pipeline_steady_vs_bare": steady / bare_rate if steady else None,
              "pipeline_end_to_end_vs_bare": crops / wall / bare_rate,
              "pipeline_steady_vs_bare_with_prior": steady * (1 + prior_fraction) / bare_rate if steady else None,
              "pipeline_steady_vs_bare_1_thread": steady / bare1_rate if steady and bare1_rate else None,
              "fg_prior_flops_fraction": prior_fraction}
    sizes = {**dataclasses.asdict(size), "crops": crops, "crops_per_image": _r(crops / max(report.processed, 1)),
             "parts": len(part_files), "steady_crops": steady_crops, "gflops_per_crop": _r(flops_crop / 1e9),
             "gflops_per_image_prior": _r(flops_image / 1e9)}
    notes.append("steady = crops of parts 2..n / (mtime of last part - mtime of first part): Ray start-up, actor "
                 "construction and the first batch excluded; end_to_end = all crops / run_extract wall time")
    return _result(sizes, timings, rates, ratios, headline, ">= 0.9", headline >= 0.9,
                   {"pipeline": mem.result, "bare_forward": bare_mem.result}, notes)


# ------------------------------------------------------------------------------------------------ 2. pseudo_label


def bench_pseudo_label(size: PseudoSize, repeats: int) -> dict[str, Any]:
    torch = _torch()
    from transfgu_dist.config import EncoderConfig, PseudoLabelConfig
    from transfgu_dist.encoder import build_encoder
    from transfgu_dist.pseudo_labels import concept_similarity, gradcam, response_maps
    from transfgu_dist.segmenter import autocast

    dev = _dev()
    encoder = build_encoder(EncoderConfig(arch=size.arch, weights="random")).to(dev)
    cfg = PseudoLabelConfig(image_size=(size.image_size, size.image_size), batch_size=size.batch_size)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(size.batch_size, 3, size.image_size, size.image_size, generator=gen).to(dev)
    timings, rates, ratios, memory = {}, {}, {}, {}

    def forward() -> None:
        with torch.no_grad(), autocast(dev):
            encoder(images, with_patch=False)

    timings["forward"] = measure(forward, repeats)
    for k in size.ks:
        concepts = torch.randn(k, encoder.dim, generator=gen).to(dev)

        def batched() -> None:
            with autocast(dev):
                gradcam(encoder, images, concepts, cfg)

        def forward_backward() -> None:
            """One forward and one backward: a single concept's loss back to A_L^cls."""
            with autocast(dev):
                out = encoder(images, with_patch=False, attn_grad=True)
                loss = cfg.loss_scale * (1 - concept_similarity(out.cls, concepts[:1].to(out.cls.dtype),
                                                                cfg.similarity))
                torch.autograd.grad(loss.sum(), out.cls_attn)

        def per_concept() -> None:
            """One forward, then K backward passes (one per concept), as a loop over concepts does it."""
            with autocast(dev):
                out = encoder(images, with_patch=False, attn_grad=True)
                loss = cfg.loss_scale * (1 - concept_similarity(out.cls, concepts.to(out.cls.dtype), cfg.similarity))
                grads = [torch.autograd.grad(loss[:, i].sum(), out.cls_attn, retain_graph=i < k - 1)[0]
                         for i in range(k)]
                grad = torch.stack(grads, 1)[..., out.n_prefix:].mean(2).unflatten(2, out.grid)
                response_maps(out.attn.detach(), grad, cfg)

        with PeakMemory() as mem:
            batched()
        memory[f"gradcam_k{k}"] = mem.result
        pair = measure_interleaved({"gradcam": batched, "forward_backward": forward_backward}, repeats)
        timings[f"gradcam_k{k}"], timings[f"forward_backward_k{k}"] = pair["gradcam"], pair["forward_backward"]
        timings[f"per_concept_loop_k{k}"] = measure(per_concept, max(1, repeats // 2), warmup=0)  # warm already
        g = timings[f"gradcam_k{k}"]["median_s"]
        ratios[f"gradcam_vs_forward_backward_k{k}"] = g / timings[f"forward_backward_k{k}"]["median_s"]
        ratios[f"per_concept_loop_speedup_k{k}"] = timings[f"per_concept_loop_k{k}"]["median_s"] / g
        ratios[f"gradcam_vs_forward_k{k}"] = g / timings["forward"]["median_s"]
        rates[f"gradcam_images_per_s_k{k}"] = _r(size.batch_size / g)
    headline = max(ratios[f"gradcam_vs_forward_backward_k{k}"] for k in size.ks)
    notes = ["ratio = worst over K of gradcam / (forward + one backward of one concept's loss to A_L^cls); "
             "per_concept_loop = one forward + K backward passes; speedup = loop / gradcam"]
    return _result({**dataclasses.asdict(size), "dim": encoder.dim}, timings, rates, ratios, headline, "<= 3",
                   headline <= 3, memory, notes)


# ------------------------------------------------------------------------------------------------ 3. cluster


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

    from transfgu_dist import parts
    from transfgu_dist.storage import StageOutput

    out = StageOutput(out_uri)
    rng = np.random.default_rng(1)
    names = []
    for i, start in enumerate(range(0, len(x), rows_per_part)):
        rows = x[start:start + rows_per_part]
        n = len(rows)
        table = pa.table({
            "image_id": pa.array([f"{i:08d}"] * n, pa.string()),
            "beta": pa.array(rng.choice([0.5, 0.4, 0.3, 0.2], n).astype(np.float32)),
            "box": parts.fixed_list(rng.integers(0, 640, (n, 4), dtype=np.int32), pa.int32()),
            "fg_fraction": pa.array(rng.random(n, dtype=np.float32)),
            "is_fg": pa.array(rng.random(n) < 0.5),
            "feature": parts.fixed_list(rows.astype(np.float16), pa.float16()),
        })
        names.append(parts.write_part(out, table, [f"{i:08d}"], []))
    return [out.part_uri(name) for name in names]


def bench_cluster(size: ClusterSize, workdir: Path, repeats: int) -> dict[str, Any]:
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    torch = _torch()
    from transfgu_dist import parts
    from transfgu_dist.concepts import kmeans
    from transfgu_dist.stages.cluster import read_pools

    timings, rates, ratios, memory = {}, {}, {}, {}
    x = clustered_features(size.points)
    use_gpu = faiss.get_num_gpus() > 0
    gemm_dev = torch.device("cuda" if use_gpu else "cpu")
    xt = torch.from_numpy(x).to(gemm_dev)
    km_repeats = max(1, repeats - 1) if size.points * size.niter > 10**7 else repeats
    for k in size.ks:
        with PeakMemory() as mem:
            timings[f"kmeans_k{k}"] = measure(lambda k=k: kmeans(x, k, niter=size.niter, seed=1), km_repeats,
                                              warmup=0)
        memory[f"kmeans_k{k}"] = mem.result
        c = xt[:k].clone()
        # the ceiling of one Lloyd iteration: the N x K x D distance GEMM
        timings[f"gemm_k{k}"] = measure(lambda c=c: torch.mm(xt, c.T), repeats)
        t = timings[f"kmeans_k{k}"]["median_s"]
        rates[f"kmeans_iterations_per_s_k{k}"] = _r(size.niter / t)
        rates[f"kmeans_gflops_k{k}"] = _r(2 * size.points * k * FEATURE_DIM * size.niter / t / 1e9)
        rates[f"gemm_gflops_k{k}"] = _r(2 * size.points * k * FEATURE_DIM / timings[f"gemm_k{k}"]["median_s"] / 1e9)
        ratios[f"kmeans_vs_gemm_ceiling_k{k}"] = size.niter * timings[f"gemm_k{k}"]["median_s"] / t
    del xt

    # Parquet: the cluster stage's read (fg and bg pools as float32) vs a raw pyarrow read
    feats = x[:size.parquet_rows] if size.parquet_rows <= len(x) else clustered_features(size.parquet_rows)
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
    reads = measure_interleaved({"parquet_stage_read": stage_read, "parquet_raw_read": raw_read,
                                 "parquet_stage_read_table_only": lambda: parts.read_table(uris, columns)}, repeats)
    timings.update(reads)
    mb = size.parquet_rows * FEATURE_DIM * 2 / 2**20
    for name in ("parquet_stage_read", "parquet_raw_read", "parquet_stage_read_table_only"):
        rates[f"{name}_rows_per_s"] = _r(size.parquet_rows / timings[name]["median_s"])
        rates[f"{name}_feature_mb_per_s"] = _r(mb / timings[name]["median_s"])
    ratios["parquet_stage_vs_raw"] = timings["parquet_raw_read"]["median_s"] / timings["parquet_stage_read"]["median_s"]
    ratios["parquet_read_table_vs_raw"] = (timings["parquet_raw_read"]["median_s"]
                                           / timings["parquet_stage_read_table_only"]["median_s"])
    headline = ratios["parquet_stage_vs_raw"]
    notes = ["ratio = Parquet feature read rate of the cluster stage's path (stages.cluster.read_pools: "
             "fg and bg float32 arrays) / pq.read_table of the same files; kmeans_vs_gemm_ceiling = niter x one N x K x D "
             "GEMM (torch) / concepts.kmeans time (1.0 = every iteration at GEMM speed)",
             f"k-means on {'GPU' if use_gpu else 'CPU'} (faiss.get_num_gpus() = {faiss.get_num_gpus()})"]
    group = pq.ParquetFile(uris[0]).metadata.row_group(0)
    encodings = next(group.column(i).encodings for i in range(group.num_columns)
                     if group.column(i).path_in_schema.startswith("feature."))
    sizes = {**dataclasses.asdict(size), "dim": FEATURE_DIM, "parquet_parts": len(uris),
             "parquet_feature_mb": round(mb, 1), "parquet_feature_encodings": list(encodings),
             "kmeans_repeats": km_repeats}
    return _result(sizes, timings, rates, ratios, headline, ">= 0.9 (read)", headline >= 0.9, memory, notes)


# ------------------------------------------------------------------------------------------------ 4. bootstrap


def write_bank(cfg, k: int, seed: int = 0) -> None:
    """A committed pseudo-label bank (random response maps) and concepts for the training images of `cfg`."""
    import pyarrow as pa

    from transfgu_dist import parts
    from transfgu_dist.concepts import Concepts
    from transfgu_dist.datasets import list_samples
    from transfgu_dist.encoder import ARCHS
    from transfgu_dist.stages.cluster import CONCEPTS, concepts_output
    from transfgu_dist.stages.pseudo_label import bank_output

    rng = np.random.default_rng(seed)
    dim, p = ARCHS[cfg.encoder.arch][1], ARCHS[cfg.encoder.arch][0]
    concepts = Concepts(rng.standard_normal((k, dim), dtype=np.float32), np.arange(k) < cfg.cluster.k_fg,
                        {"fg": 0.0, "bg": 0.0})
    buf = io.BytesIO()
    np.savez(buf, **concepts.to_arrays())
    out = concepts_output(cfg)
    out.write_part(CONCEPTS, buf.getvalue())
    out.commit({"k_fg": cfg.cluster.k_fg, "k_bg": cfg.cluster.k_bg})
    h, w = (s // p for s in cfg.pseudo.image_size)
    samples = list_samples(cfg, cfg.data.train_split)
    bank = bank_output(cfg)
    for start in range(0, len(samples), cfg.pseudo.batch_size):
        chunk = samples[start:start + cfg.pseudo.batch_size]
        n = len(chunk)
        table = pa.table({
            "image_id": pa.array([s.image_id for s in chunk], pa.string()),
            "uri": pa.array([s.image for s in chunk], pa.string()),
            "grid": parts.fixed_list(np.tile(np.array([h, w], np.int32), (n, 1)), pa.int32()),
            "maps": parts.fixed_list(rng.random((n, k * h * w), dtype=np.float32).astype(np.float16), pa.float16()),
            "fg_prior": parts.fixed_list(rng.random((n, h * w)) < 0.5, pa.bool_()),
        })
        parts.write_part(bank, table, [s.image_id for s in chunk], [])
    bank.commit({"images": len(samples), "bad_images": []})


def bare_bootstrapper(cfg):
    """A Bootstrapper built outside Ray Train (its constructor needs a Train context), in round >= 1."""
    torch = _torch()
    from transfgu_dist.augment import AugmentConfig
    from transfgu_dist.decoder import MaskTransformer
    from transfgu_dist.encoder import build_encoder
    from transfgu_dist.stages.bootstrap import Bootstrapper, make_optimizer

    dev = _dev()
    boot = Bootstrapper.__new__(Bootstrapper)
    boot.cfg, boot.dev = cfg, dev
    boot.encoder = build_encoder(cfg.encoder).to(dev)
    torch.manual_seed(cfg.train.seed)
    boot.student = MaskTransformer(boot.encoder.dim, cfg.n_outputs, cfg.decoder).to(dev)
    boot.initial = copy.deepcopy(boot.student.state_dict())
    boot.teacher = None
    boot.optimizer = make_optimizer(boot.student, cfg)
    boot.aug = AugmentConfig(per_batch=cfg.train.per_batch_augment)
    boot.gen = torch.Generator(device=dev).manual_seed(cfg.train.seed)
    boot.is_fg = None
    boot.model = boot.student
    boot.start_round()
    return boot


def bench_bootstrap(size: BootstrapSize, workdir: Path, repeats: int) -> dict[str, Any]:
    torch = _torch()
    from transfgu_dist.encoder import ARCHS
    from transfgu_dist.stages.bootstrap import bootstrap_output, run_bootstrap

    k_fg = size.k // 2
    img = f"[{size.image_size}, {size.image_size}]"
    overrides = [f"encoder.arch={size.arch}", f"data.synthetic_train={size.images}", f"data.limit={size.images}",
                 f"pseudo.image_size={img}", f"train.image_size={img}", f"crops.image_size={img}",
                 f"cluster.k_fg={k_fg}", f"cluster.k_bg={size.k - k_fg}", f"train.batch_size={size.batch_size}",
                 f"train.round_epochs=[1, {size.epochs}]", "train.max_failures=0", "train.eval_every=0"]
    _write_images(workdir / "data", size.images, size.image_size)
    timings, rates, ratios, memory = {}, {}, {}, {}
    notes = []
    from transfgu_dist.stages.common import cluster_gpus

    gpus = cluster_gpus()
    for workers in size.workers:
        if gpus and workers > gpus:
            notes.append(f"{workers} workers skipped: the cluster has {gpus} GPU(s), one per worker")
            continue
        cpus = min(1.0, (os.cpu_count() or 1) / workers / 2) if workers > 1 else 1.0
        cfg = _config(workdir, f"bootstrap_w{workers}",
                      [*overrides, f"train.num_workers={workers}", f"train.cpus_per_worker={cpus}"])
        for attempt in range(2):  # Ray Train on overloaded shared cores can lose a worker group: start afresh
            shutil.rmtree(cfg.output, ignore_errors=True)
            write_bank(cfg, size.k)
            try:
                with PeakMemory() as mem:
                    start = time.perf_counter()
                    run_bootstrap(cfg)
                    wall = time.perf_counter() - start
                break
            except Exception as e:  # noqa: BLE001
                if attempt == 1:
                    raise
                notes.append(f"{workers} worker(s): first fit failed ({type(e).__name__}: {str(e)[:200]}); "
                             f"measured a second fit")
        memory[f"workers_{workers}"] = mem.result
        boot_dir = Path(bootstrap_output(cfg).uri)
        steady, samples, span = _steady_rate([boot_dir / "round-0.pt", boot_dir / "round-1.pt"],
                                             lambda p: size.epochs * size.images)
        timings[f"fit_wall_workers_{workers}"] = {"median_s": round(wall, 4), "runs_s": [round(wall, 4)]}
        timings[f"round1_span_workers_{workers}"] = {"median_s": round(span, 4), "runs_s": [round(span, 4)]}
        rates[f"samples_per_s_workers_{workers}"] = _r(steady) if steady else None
        rates[f"end_to_end_samples_per_s_workers_{workers}"] = _r((1 + size.epochs) * size.images / wall)
        rates[f"cpus_per_worker_{workers}"] = cpus

    # the ceiling: the same training step (teacher present), in-process, on a fixed batch
    cfg = _config(workdir, "bootstrap_w1", [*overrides])
    boot = bare_bootstrapper(cfg)
    p = ARCHS[size.arch][0]
    h = size.image_size // p
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (size.batch_size, size.image_size, size.image_size, 3),
                                    dtype=torch.uint8, generator=gen).to(boot.dev),
             "maps": torch.rand(size.batch_size, size.k, h, h, generator=gen).half().to(boot.dev),
             "fg_prior": (torch.rand(size.batch_size, h, h, generator=gen) < 0.5).to(boot.dev)}
    with PeakMemory() as mem:
        timings["bare_step"] = measure(lambda: boot.step(batch, 0.05), repeats)
    memory["bare_step"] = mem.result
    bare_rate = size.batch_size / timings["bare_step"]["median_s"]
    rates["bare_step_samples_per_s"] = _r(bare_rate)
    bare1_rate = None
    if boot.dev.type == "cpu" and torch.get_num_threads() > 1:
        with torch_threads(1):
            timings["bare_step_1_thread"] = measure(lambda: boot.step(batch, 0.05), repeats)
        bare1_rate = size.batch_size / timings["bare_step_1_thread"]["median_s"]
        rates["bare_step_samples_per_s_1_thread"] = _r(bare1_rate)
    s1, s2 = rates.get("samples_per_s_workers_1"), rates.get("samples_per_s_workers_2")
    ratios["workers_1_vs_bare"] = s1 / bare_rate if s1 else None
    ratios["workers_2_vs_bare"] = s2 / bare_rate if s2 else None
    ratios["workers_2_vs_1"] = s2 / s1 if s1 and s2 else None
    ratios["workers_1_vs_bare_1_thread"] = s1 / bare1_rate if s1 and bare1_rate else None
    best = max((v for v in (s1, s2) if v), default=None)
    if best is None:  # a single published round file: fall back to the end-to-end rate
        best = max(v for k, v in rates.items() if k.startswith("end_to_end_samples_per_s"))
    headline = best / bare_rate
    notes += ["samples_per_s = round-1 samples (epochs x images) / (mtime round-1.pt - mtime round-0.pt): the "
             "steady state of teacher-student training, checkpoint reports included, Ray Train start-up excluded",
             "ratio = best of the Ray Train rates / the bare Bootstrapper.step in this process (all cores, fixed "
             "batch, no data loading); on CPU Ray gives each worker OMP_NUM_THREADS = its (rounded) CPUs"]
    sizes = {**dataclasses.asdict(size), "train_crop": size.image_size // 2}
    return _result(sizes, timings, rates, ratios, headline, ">= 0.9", headline >= 0.9, memory, notes)


# ------------------------------------------------------------------------------------------------ driver


def _local_ray_on_loopback() -> None:
    """Make a local Ray bind to 127.0.0.1: Ray resolves `_node_ip_address="127.0.0.1"` to the machine's routable
    IP unless its cluster mode is off (the env var reaches every Ray process this driver starts)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def run(only: Sequence[str] = BENCHMARKS, size: str = "small", repeats: int | None = None,
        workdir: str | Path | None = None, address: str | None = None,
        log: Callable[[str], None] | None = None, worker_threads: int | None = None,
        out: str | Path | None = None) -> dict[str, Any]:
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
    doc: dict[str, Any] = {"schema": SCHEMA, "size": size, "created": _dt.datetime.now(_dt.timezone.utc)
                           .isoformat(timespec="seconds"), "device": device_name(), "versions": versions(),
                           "cpu_count": os.cpu_count(), "repeats": reps, "load_average": _loadavg(),
                           "worker_threads": worker_threads or "ray default (OMP_NUM_THREADS = the task's CPUs)",
                           "benchmarks": {}}

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
            start, load_start = time.perf_counter(), _loadavg()
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
                result = {"error": f"{type(e).__name__}: {e}"[:2000],
                          "traceback": traceback.format_exc()[-4000:]}
            result["bench_wall_s"] = round(time.perf_counter() - start, 2)
            result["load_average"] = {"start": load_start, "end": _loadavg()}
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
