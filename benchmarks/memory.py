"""Peak memory of a benchmark: this process's RSS high-water mark, the sampled RSS of its process tree (a local
Ray descends from the driver) and CUDA memory."""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from typing import Any

from benchmarks.env import torch_module


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (a local Ray's GCS, raylet and workers descend from the driver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_text(f"/proc/{entry}/stat")
            if stat:
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def rss(pid: int) -> int:
    statm = read_text(f"/proc/{pid}/statm")
    return int(statm.split()[1]) * resource.getpagesize() if statm else 0


def status_kb(key: str) -> int | None:
    for line in (read_text("/proc/self/status") or "").splitlines():
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
        pids = process_tree(os.getpid())
        sizes = {pid: rss(pid) for pid in pids}
        children = [v for pid, v in sizes.items() if pid != os.getpid()]
        return sum(sizes.values()), max(children, default=0), self._cuda_used()

    def _cuda_used(self) -> int:
        torch = torch_module()
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
        torch = torch_module()
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
        torch = torch_module()
        mb = 1 << 20
        out: dict[str, Any] = {}
        if self._proc:
            self._stop.set()
            self._thread.join()
            self._update(*self._sample())
        hwm = status_kb("VmHWM") if self._hwm_reset else None
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
