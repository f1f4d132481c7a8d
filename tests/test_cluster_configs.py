"""The shipped cluster configs pass Ray's launcher schema and the RayJob fields they use, and hold what the stages
ask for; broken copies are flagged."""

from __future__ import annotations

from pathlib import Path

import yaml

from transfgu_dist.config import load_config
from transfgu_dist.pipeline.cluster_config import (
    capacity_problems,
    launcher_gpus,
    launcher_problems,
    rayjob_gpus,
    rayjob_problems,
)

ROOT = Path(__file__).resolve().parents[1]
AWS, KUBERAY = ROOT / "cluster" / "aws-gpu.yaml", ROOT / "cluster" / "kuberay-rayjob.yaml"


def edited(src: Path, tmp_path: Path, change) -> Path:
    tree = yaml.safe_load(src.read_text())
    change(tree)
    out = tmp_path / src.name
    out.write_text(yaml.safe_dump(tree))
    return out


def test_shipped_configs_pass_and_scale_to_four_gpus():
    assert launcher_problems(AWS, ROOT) == []
    assert rayjob_problems(KUBERAY, ROOT) == []
    assert launcher_gpus(AWS) == 4 and rayjob_gpus(KUBERAY) == 4  # 4 one-GPU nodes each
    for preset in ("cocostuff27", "voc", "lip5"):  # the real-data presets' defaults fit both
        cfg = load_config(overrides=[f"preset={preset}"])
        assert capacity_problems(cfg, 4, "aws") == []


def test_launcher_schema_errors_are_flagged(tmp_path):
    def break_it(t):
        t["max_workers"] = "four"
        t["available_node_types"]["ray.worker.gpu"]["resources"] = {"GPU": 0.5}
        t["head_node_type"] = "ray.head.gpu"

    problems = launcher_problems(edited(AWS, tmp_path, break_it), ROOT)
    assert len(problems) == 3, problems
    assert any("max_workers: 'four' is not of type 'integer'" in p for p in problems)
    assert any("resources.GPU: 0.5 is not of type 'integer'" in p for p in problems)
    assert any("head_node_type 'ray.head.gpu' is not in available_node_types" in p for p in problems)


def test_rayjob_errors_are_flagged(tmp_path):
    def break_it(t):
        t["spec"]["entrypoint"] = "python jobs/run_all.py --config configs/missing.yaml"
        t["spec"]["backofLimit"] = 2  # misspelt
        t["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 5

    problems = rayjob_problems(edited(KUBERAY, tmp_path, break_it), ROOT)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "spec: unknown RayJob field 'backofLimit'",
        "spec.entrypoint names configs/missing.yaml, which is not in the repository",
        "workerGroupSpecs gpu-a10g: expected minReplicas <= replicas <= maxReplicas",
    ]


def test_a_pool_larger_than_the_cluster_is_flagged():
    cfg = load_config(overrides=["preset=cocostuff27", "resources.pool_max=8", "train.num_workers=[2, 6]"])
    assert capacity_problems(cfg, launcher_gpus(AWS), "cluster/aws-gpu.yaml") == [
        "cluster/aws-gpu.yaml: resources.pool_max = 8 actors x actor_gpus = 1.0 needs 8 GPUs, the cluster scales to 4",
        "cluster/aws-gpu.yaml: train.num_workers = (2, 6) needs one GPU each, the cluster scales to 4",
    ]
    half = load_config(overrides=["preset=cocostuff27", "resources.pool_max=8", "resources.actor_gpus=0.5"])
    assert capacity_problems(half, 4, "x") == []  # two actors share each GPU
