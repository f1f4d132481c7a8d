"""The fake autoscaler (benchmarks.fake_cluster.fake_autoscaling_cluster): a head with no GPU and a GPU node type of
`min_workers: 0`, as cluster/aws-gpu.yaml. run_all asks for GPUs (resources.actor_gpus=1, resources.cluster_gpu), the
autoscaler adds GPU nodes for them, and the encoder actors run there."""

from __future__ import annotations

import pytest
from ray.util.state import list_actors, list_nodes

from benchmarks.elastic import SETTINGS
from benchmarks.fake_cluster import Job, fake_autoscaling_cluster

pytestmark = pytest.mark.slow
ENCODERS = ("CropEncoder", "ConceptMapper", "Predictor")  # extract, pseudo_label, evaluate


def test_run_all_gets_gpu_nodes_from_the_autoscaler(tmp_path):
    with fake_autoscaling_cluster(head_cpus=1, max_nodes=2) as cluster:
        assert [n.resources_total.get("GPU", 0) for n in list_nodes(cluster.dashboard, detail=True)] == [0]
        out = tmp_path / "run"
        console = Job("run_all", cluster.address, f"output={out}", *SETTINGS).finish()
        assert "stage evaluate: done" in console and (out / "bootstrap" / "final.pt").exists()
        nodes = {n.node_id: n for n in list_nodes(cluster.dashboard, detail=True)}
        actors = [a for a in list_actors(cluster.dashboard, detail=True, limit=10_000) if a.class_name in ENCODERS]
    gpu_nodes = {i for i, n in nodes.items() if n.resources_total.get("GPU") == 1 and not n.is_head_node}
    assert 1 <= len(gpu_nodes) <= 2  # added on demand, at most max_workers
    assert {a.class_name for a in actors} == set(ENCODERS)
    for actor in actors:
        assert actor.node_id in gpu_nodes and actor.required_resources.get("GPU") == 1, actor
