"""Where a bootstrap epoch's time goes, per worker: waiting for batches (ingest_wait), training steps (step),
validation (validate, rank 0), the MLflow record (log, rank 0) and the checkpoint report (checkpoint: the files and
ray.train.report of the previous epoch, known only once it returned). The loop reports each epoch's split; the
manifest's metrics keep one per epoch (`epoch_times`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch.distributed as dist

PHASES = ("ingest_wait", "step", "validate", "log", "checkpoint")


class EpochClock:
    """Seconds per phase of one epoch on this worker."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def batches(self, batches: Iterable[Any]) -> Iterator[Any]:
        """`batches`, the wait for each counted as ingest_wait and the time until the next one is asked for (the
        training step) as step."""
        it = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self.seconds["ingest_wait"] += time.perf_counter() - start
                return
            asked = time.perf_counter()
            self.seconds["ingest_wait"] += asked - start
            yield batch
            self.seconds["step"] += time.perf_counter() - asked

    def phase(self, name: str) -> _Phase:
        """A block timed as `name`."""
        return _Phase(self.seconds, name)

    def record(self, world_size: int) -> dict[str, list[float]]:
        """Every worker's seconds per phase (lists indexed by rank; a collective call, on every rank), and each
        worker's data_wait: the fraction of its ingest and step time spent waiting for batches."""
        mine = [round(self.seconds[p], 4) for p in PHASES]
        every = [mine]
        if world_size > 1 and dist.is_initialized():
            every = [None] * world_size
            dist.all_gather_object(every, mine)
        out = {p: [r[i] for r in every] for i, p in enumerate(PHASES)}
        out["data_wait"] = [round(w / max(w + s, 1e-9), 4) for w, s in zip(out["ingest_wait"], out["step"])]
        return out


class _Phase:
    def __init__(self, seconds: dict[str, float], name: str):
        self.seconds, self.name = seconds, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self.name] += time.perf_counter() - self.start
