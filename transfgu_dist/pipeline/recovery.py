"""Node losses while a Ray Data stage runs: one driver line per lost node, as it happens."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import ray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LostNode:
    node_id: str
    address: str
    gpus: float
    at: float  # wall clock (time.time()) when the driver saw it dead


def alive_nodes() -> dict[str, dict]:
    return {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}


@contextlib.contextmanager
def node_losses(stage: str, poll: float = 0.5) -> Iterator[list[LostNode]]:
    """While the block runs, every `poll` s: nodes alive at its start (or joining since) that died are appended to
    the yielded list and named in one warning each. Ray Data retries the dead node's tasks and restarts its actors
    (image_pool.actor_pool); this only says so."""
    lost: list[LostNode] = []
    stop = threading.Event()
    known = alive_nodes()

    def watch() -> None:
        while not stop.wait(poll):
            alive = alive_nodes()
            for node_id in known.keys() - alive.keys():
                n = known.pop(node_id)
                lost.append(LostNode(node_id, n["NodeManagerAddress"], n["Resources"].get("GPU", 0.0), time.time()))
                log.warning(
                    "%s: lost node %s (%s, %g GPU): Ray Data retries its tasks and restarts its actors on the others",
                    stage,
                    node_id[:8],
                    n["NodeManagerAddress"],
                    lost[-1].gpus,
                )
            known.update(alive)

    watcher = threading.Thread(target=watch, name=f"{stage}-node-losses", daemon=True)
    watcher.start()
    try:
        yield lost
    finally:
        stop.set()
        watcher.join()
