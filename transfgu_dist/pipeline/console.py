"""The driver's console: one progress display per image stage and one line per training epoch.

On a terminal a stage shows a tqdm bar (images/s, ETA); elsewhere (CI logs, captured output) a log line at most
every `Progress.every` seconds and one at the end, so a log keeps a few lines. Training epochs reach the driver
through a Ray Train `UserCallback` (it runs in the Train controller, whose own output stays in Ray's log files
like every worker's) and a Ray queue the driver reads. Ray's C++ core prints its error lines on the driver's
stderr as well as into its log file; `native_ray_lines_hidden` keeps them (fatal ones excepted) off the console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger("transfgu_dist")
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} images [{elapsed}<{remaining}, {rate_noinv_fmt}]"


class Progress:
    """Images done out of `total` for the stage `desc`."""

    every = 30.0  # seconds between two lines off a terminal (at most: a line is due even when nothing moved)

    def __init__(self, desc: str, total: int, tty: bool | None = None):
        self.desc, self.total, self.n = desc, total, 0
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.start = self.shown = time.perf_counter()
        self.bar = (
            tqdm(total=total, desc=desc, unit=" images", bar_format=BAR_FORMAT, file=sys.stderr) if self.tty else None
        )
        self.closed = threading.Event()
        if not self.tty:
            threading.Thread(target=self.tick, name=f"progress-{desc}", daemon=True).start()

    def tick(self) -> None:
        """Off a terminal: a line whenever `every` seconds passed without one, until closed."""
        while not self.closed.wait(self.every / 10):
            if time.perf_counter() - self.shown >= self.every:
                log.info(self.line())
                self.shown = time.perf_counter()

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.perf_counter() - self.shown >= self.every and self.n < self.total:
            log.info(self.line())
            self.shown = time.perf_counter()

    def line(self) -> str:
        return tqdm.format_meter(
            self.n,
            self.total,
            time.perf_counter() - self.start,
            prefix=self.desc,
            unit=" images",
            bar_format=LINE_FORMAT,
        )

    def close(self) -> None:
        self.closed.set()
        if self.bar is not None:
            self.bar.close()
        else:
            log.info(self.line())


def above_the_bar(progress: Progress) -> contextlib.AbstractContextManager:
    """On a terminal, log lines printed above the progress bar, not through it."""
    if not progress.tty:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def track(
    rows: Iterable[dict[str, Any]], desc: str, total: int, images: Callable[[dict[str, Any]], int]
) -> Iterator[dict[str, Any]]:
    """`rows` (a stage's output rows as they complete), with `images(row)` images each counted on a Progress."""
    progress = Progress(desc, total)
    with above_the_bar(progress):
        try:
            for row in rows:
                progress.update(images(row))
                yield row
        finally:
            progress.close()


def driver_queue() -> Any:
    """A Ray queue on the driver's node: a worker node lost mid-stage must not take the driver's lines with it."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


@contextlib.contextmanager
def images_done(desc: str, total: int, poll: float = 0.5) -> Iterator[Any]:
    """A Progress of `total` images fed by the stage's actors: they put the number of images each encoder batch
    finished into the yielded Ray queue, and the driver counts them as they arrive (not per committed part)."""
    from ray.util.queue import Empty

    queue, progress, stop = driver_queue(), Progress(desc, total), threading.Event()

    def count() -> None:
        while True:
            try:
                progress.update(queue.get(timeout=poll))
            except Empty:
                if stop.is_set():
                    return

    reader = threading.Thread(target=count, name=f"images-{desc}", daemon=True)
    reader.start()
    try:
        with above_the_bar(progress):
            yield queue
    finally:
        stop.set()
        reader.join()
        queue.shutdown()
        progress.close()


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    """`bootstrap: epoch 2/4 (round 1, epoch 0): loss 3.204 (peer 1.840, diversity 0.111, uncertainty 0.512),
    val mIoU 40.74, 12.3 s/epoch` from one epoch's rank-0 report (train_loop's metrics)."""
    terms = ", ".join(
        f"{k.removeprefix('loss/')} {v:.3f}" for k, v in m.items() if k.startswith("loss/") and k != "loss/total"
    )
    text = (
        f"bootstrap: epoch {m['global_epoch'] + 1}/{epochs} (round {m['round']}, epoch {m['epoch']}): "
        f"loss {m.get('loss/total', float('nan')):.3f} ({terms})"
    )
    if "val/miou" in m:
        text += f", val mIoU {100 * m['val/miou']:.2f}"
    return text + (f", {m['epoch_seconds']:.1f} s/epoch" if "epoch_seconds" in m else "")


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


class Recoveries:
    """The driver's lines on worker-group failures: what was lost, then, at the restarted group's first report, what
    was redone (epochs since the last checkpoint) and how long the group was down."""

    def __init__(self, epochs: int):
        self.epochs, self.done, self.failed_at = epochs, 0, None  # done: epochs reported so far

    def see(self, m: dict[str, Any], now: float) -> str | None:
        if "lost" in m:
            self.failed_at = self.failed_at or now
            ranks = "; ".join(f"rank {r}: {e}" for r, e in sorted(m["lost"].items()))
            return (
                f"bootstrap: worker group failed after epoch {self.done}/{self.epochs} ({ranks}); "
                "Ray Train restarts it from the last checkpoint"
            )
        line = None
        if self.failed_at is not None:
            line = (
                f"bootstrap: resumed at epoch {m['resumed_at'] + 1}/{self.epochs} with {m['world_size']} workers, "
                f"{m['group_started_at'] - self.failed_at:.1f} s after the failure; "
                f"epochs redone: {self.done - m['resumed_at']}"
            )
            self.failed_at = None
        self.done = m["global_epoch"] + 1
        return line


def epoch_reporter_class() -> type:
    """ray.train.UserCallback subclass (built lazily: importing this module does not import Ray)."""
    import ray.train

    class EpochReporter(ray.train.UserCallback):
        """In the Train controller: each epoch's rank-0 metrics into the driver's queue."""

        def __init__(self, queue: Any):
            self.queue = queue

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics:
                self.queue.put(dict(metrics[0]))

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            self.queue.put({"lost": {rank: first_line(e) for rank, e in worker_exceptions.items()}})

    return EpochReporter


@contextlib.contextmanager
def epoch_lines(epochs: int, poll: float = 0.5) -> Iterator[Any]:
    """A Ray Train callback whose epochs the driver logs as they end (one `epoch_line` each) while the block runs;
    the lines still queued when it ends are logged before it returns."""
    from ray.util.queue import Empty

    queue, stop, recoveries = driver_queue(), threading.Event(), Recoveries(epochs)

    def show() -> None:
        while True:
            try:
                m = queue.get(timeout=poll)
            except Empty:
                if stop.is_set():
                    return
                continue
            if line := recoveries.see(m, time.time()):
                log.warning(line)
            if "lost" not in m:
                log.info(epoch_line(m, epochs))

    reader = threading.Thread(target=show, name="epoch-lines", daemon=True)
    reader.start()
    try:
        yield epoch_reporter_class()(queue)
    finally:
        stop.set()
        reader.join()
        queue.shutdown()


# `[2026-12-02 01:02:33,867 E 20565 20565] core_worker.cc:2465: ...`: a C++ log line of Ray (fatal ones are `F`)
NATIVE_RAY_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWE] \d+ \d+\] \w+\.(cc|h):\d+: ")


def pass_through(chunk: bytes, held: bytes) -> tuple[bytes, bytes]:
    """Stderr bytes (`held`, the unfinished line of the last chunk, then `chunk`) -> (what to print now, what to
    hold). Whole lines print unless they are Ray C++ lines; an unfinished line prints at once (a progress bar's
    carriage-return updates) unless it may be the start of one."""
    data = held + chunk
    *lines, rest = data.split(b"\n")
    shown = b"".join(line + b"\n" for line in lines if not NATIVE_RAY_LINE.match(line))
    if rest and not rest.startswith(b"["):
        return shown + rest, b""
    return shown, rest


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


@contextlib.contextmanager
def native_ray_lines_hidden(hide: bool = True) -> Iterator[None]:
    """While the block runs, this process's stderr (fd 2) goes through `pass_through`: Ray's C++ lines, which Ray
    also writes to <session>/logs/python-core-driver-*.log, stay off the console. Start it after ray.init, so the
    Ray services it starts keep the real stderr."""
    if not hide:
        yield
        return
    sys.stderr.flush()
    console, (read, write) = os.dup(2), os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        held = b""
        while chunk := os.read(read, 65536):
            shown, held = pass_through(chunk, held)
            write_all(console, shown)
        write_all(console, held)
        os.close(read)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)  # closes the pipe's last write end: the pump reads to its end and stops
        thread.join(timeout=10)
        os.close(console)
