"""A multi-node Ray on one machine, for the node-loss tests and `jobs/bench.py --size elastic`: a head with no CPU
or GPU and worker nodes of 2 CPUs and 1 declared GPU (ray.cluster_utils.Cluster: Ray schedules by the GPUs, torch
computes on the CPU), the pipeline's jobs run against it as a user submits them, and nodes removed by their handles.

The cluster lives in its own temp dir (RAY_TMPDIR, so its address file too: no other `ray.init()` on the machine
joins it) and on free ports, and is shut down by its handle, never with `ray stop`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODE = {"num_cpus": 2, "num_gpus": 1, "object_store_memory": 200 * 2**20}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_processes_under(temp: str) -> None:
    """SIGKILL this cluster's processes left behind (their command lines name its temp dir)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, ValueError):
            if temp in cmdline.read_text(errors="ignore"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)


def start_head(temp: str, tries: int = 3):
    """The Cluster and its head node; Ray gives a node 30 s to register, which a loaded machine can miss, so a
    head that timed out is killed and started again."""
    from ray.cluster_utils import Cluster

    def head():
        args = {"num_cpus": 0, "num_gpus": 0, "gcs_server_port": free_port(), "dashboard_port": free_port()}
        return Cluster(initialize_head=True, head_node_args=args)

    for _ in range(tries - 1):
        try:
            return head()
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception on the timeout
            kill_processes_under(temp)
    return head()


@contextlib.contextmanager
def fake_cluster(nodes: int = 3) -> Iterator[object]:
    """A started ray.cluster_utils.Cluster with `nodes` GPU worker nodes (NODE each)."""
    temp = tempfile.mkdtemp(prefix="r21", dir="/tmp")  # short: Ray's socket paths live under it
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS")}
    os.environ["RAY_TMPDIR"] = temp
    os.environ.pop("RAY_ADDRESS", None)
    try:
        cluster = start_head(temp)
        try:
            for _ in range(nodes):
                cluster.add_node(**NODE)
            yield cluster
        finally:
            cluster.shutdown()
    finally:
        kill_processes_under(temp)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(temp, ignore_errors=True)


class Job:
    """`python jobs/<stage>.py --address=<cluster> args...`, its console collected line by line as it runs."""

    def __init__(self, stage: str, address: str, *args: str):
        self.started = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / f"{stage}.py"), f"--address={address}", *args],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, ready: Callable[[], bool], timeout: float = 900) -> None:
        end = time.time() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError("the job ended first:\n" + "".join(self.lines)[-6000:])
            if time.time() > end:
                raise TimeoutError("".join(self.lines)[-6000:])
            time.sleep(0.2)

    def printed(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def finish(self, timeout: float = 1800) -> str:
        self.proc.wait(timeout)
        self.reader.join()
        console = "".join(self.lines)
        if self.proc.returncode:
            raise RuntimeError(f"job failed ({self.proc.returncode}):\n{console[-9000:]}")
        return console


def node_of(cluster, actor_class: str):
    """The worker node running a live actor whose class name contains `actor_class`."""
    nodes = {n.node_id: n for n in cluster.worker_nodes}
    for actor in cluster.global_state.actor_table(None).values():
        if actor_class in actor["ActorClassName"] and actor["State"] == "ALIVE":
            return nodes[actor["Address"]["NodeID"]]
    raise LookupError(f"no live {actor_class} actor on a worker node")


def replace_node(cluster, node) -> float:
    """Kill `node`'s processes (as a spot preemption does) and add a fresh node, as the autoscaler would; returns
    the wall clock of the kill."""
    at = time.time()
    cluster.remove_node(node, allow_graceful=False)
    cluster.add_node(wait=False, **NODE)
    return at
