"""`jobs/bench.py --size elastic`: throughput including recovery on the fake 3-node cluster (benchmarks.fake_cluster),
as Ray's elastic-training release test reports it: work done over the whole wall time, a lost node's redone work and
the recovery included.

Per stage (extract: images/s; bootstrap: epochs/min), once with no node lost (the stage times of one run_all, which
also makes the inputs) and once with one node removed mid-stage (extract: once its first part is written;
bootstrap: after epoch 1, the training worker's node), a fresh node then added as the autoscaler would. Recovery
seconds: extract, from the kill to the next part written; bootstrap, from the kill to the restarted worker group's
start (its `group_started_at`). Stage seconds are the driver's own `stage <name>: done in S s` line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

SETTINGS = [
    "encoder.arch=vit_tiny_test",
    "encoder.weights=random",
    "data.synthetic_train=32",
    "data.synthetic_val=6",
    "data.synthetic_size=128",
    "crops.image_size=[128, 128]",
    "crops.crop_size=64",
    "crops.images_per_task=2",
    "crops.images_per_part=4",
    "pseudo.images_per_part=4",
    "pseudo.image_size=[64, 64]",
    "train.image_size=[64, 64]",
    "eval.image_size=[64, 64]",
    "train.round_epochs=[2, 2]",
    "train.batch_size=8",
    "pseudo.batch_size=4",
    "train.use_gpu=false",  # gloo: the declared GPUs have no CUDA behind them
    "resources.actor_gpus=1",
    "resources.pool_min=1",
    "resources.pool_max=3",
]
IMAGES, EPOCHS = 32, 4


def stage_seconds(console: str, stage: str) -> float:
    return float(re.search(rf"stage {stage}: done in ([\d.]+) s", console).group(1))


def lost_extract(cluster, data: Path, out: Path) -> dict[str, Any]:
    from benchmarks.fake_cluster import Job, node_of, replace_node

    job = Job("extract", cluster.address, f"output={out}", f"data.root={data}", *SETTINGS)
    job.wait_for(lambda: any((out / "features").glob("part-*.parquet")))
    before = set((out / "features").glob("part-*.parquet"))
    killed = replace_node(cluster, node_of(cluster, "CropEncoder"))
    console = job.finish()
    after = [p.stat().st_mtime for p in (out / "features").glob("part-*.parquet") if p not in before]
    seconds = stage_seconds(console, "extract")
    return {
        "stage_s": seconds,
        "images_per_s": round(IMAGES / seconds, 3),
        "recovery_s": round(min(after) - killed, 2) if after else None,  # None: the kill came after the last part
    }


def lost_bootstrap(cluster, inputs: Path, out: Path) -> dict[str, Any]:
    from benchmarks.fake_cluster import Job, node_of, replace_node

    for stage in ("data", "features", "concepts", "bank"):
        shutil.copytree(inputs / stage, out / stage)
    job = Job("bootstrap", cluster.address, f"output={out}", *SETTINGS)
    job.wait_for(lambda: job.printed(f"bootstrap: epoch 1/{EPOCHS}"))
    killed = replace_node(cluster, node_of(cluster, "RayTrainWorker"))
    console = job.finish()
    metrics = json.loads((out / "bootstrap" / "_SUCCESS.json").read_text())["metrics"]
    seconds = stage_seconds(console, "bootstrap")
    return {
        "stage_s": seconds,
        "epochs_per_min": round(60 * EPOCHS / seconds, 3),
        "recovery_s": round(metrics["group_started_at"] - killed, 2),
        "resumed_at_epoch": metrics["resumed_at"],
        "recovery_lines": [
            line.strip() for line in console.splitlines() if "worker group failed" in line or "resumed at" in line
        ],
    }


def run_elastic(workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks.env import device_name
    from benchmarks.fake_cluster import Job, fake_cluster

    with fake_cluster(3) as cluster:
        log("elastic: run_all with no node lost")
        console = Job("run_all", cluster.address, f"output={workdir / 'clean'}", *SETTINGS).finish()
        clean = {s: stage_seconds(console, s) for s in ("extract", "bootstrap")}
        log("elastic: extract, one node lost")
        extract = lost_extract(cluster, workdir / "clean" / "data", workdir / "lost-extract")
        log("elastic: bootstrap, one node lost")
        bootstrap = lost_bootstrap(cluster, workdir / "clean", workdir / "lost-bootstrap")
    return {
        "size": "elastic",
        "device": device_name(),
        "cluster": "ray.cluster_utils.Cluster: head 0 CPU 0 GPU, 3 nodes of 2 CPU + 1 declared GPU, one machine",
        "loadavg": os.getloadavg(),
        "images": IMAGES,
        "epochs": EPOCHS,
        "extract": {
            "no_loss": {"stage_s": clean["extract"], "images_per_s": round(IMAGES / clean["extract"], 3)},
            "one_node_lost": extract,
        },
        "bootstrap": {
            "no_loss": {"stage_s": clean["bootstrap"], "epochs_per_min": round(60 * EPOCHS / clean["bootstrap"], 3)},
            "one_node_lost": bootstrap,
        },
    }
