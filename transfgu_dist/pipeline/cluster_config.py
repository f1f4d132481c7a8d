"""Checks of the shipped cluster configs: the launcher YAML against the JSON schema Ray's launcher validates with
(ray/autoscaler/ray-schema.json), the KubeRay RayJob against the RayJob (ray.io/v1) fields it uses, and both
against what a run's `resources` and `train` settings ask for."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import ray
import yaml

from transfgu_dist.config import Config, worker_range

LAUNCHER_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
# the RayJob (ray.io/v1) fields the shipped file uses, per object; any other key is flagged as unknown
RAYJOB_FIELDS = {
    "spec": {
        "entrypoint",
        "submissionMode",
        "shutdownAfterJobFinishes",
        "ttlSecondsAfterFinished",
        "activeDeadlineSeconds",
        "backoffLimit",
        "runtimeEnvYAML",
        "rayClusterSpec",
        "suspend",
        "entrypointNumCpus",
        "entrypointNumGpus",
        "entrypointResources",
        "jobId",
        "metadata",
        "clusterSelector",
        "submitterPodTemplate",
        "deletionStrategy",
    },
    "rayClusterSpec": {
        "rayVersion",
        "enableInTreeAutoscaling",
        "autoscalerOptions",
        "headGroupSpec",
        "workerGroupSpecs",
        "headServiceAnnotations",
        "suspend",
        "gcsFaultToleranceOptions",
    },
    "headGroupSpec": {"rayStartParams", "template", "serviceType", "headService", "enableIngress"},
    "workerGroupSpecs": {
        "groupName",
        "replicas",
        "minReplicas",
        "maxReplicas",
        "rayStartParams",
        "template",
        "numOfHosts",
        "idleTimeoutSeconds",
        "suspend",
    },
}


def launcher_problems(path: str | Path, repo: str | Path = ".") -> list[str]:
    """Where a cluster launcher YAML breaks Ray's launcher schema, or names a node type or local file that is not
    there; [] when it passes."""
    config = yaml.safe_load(Path(path).read_text())
    schema = json.loads(LAUNCHER_SCHEMA.read_text())
    problems = [
        f"{path}: {'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(config)
    ]
    types = config.get("available_node_types", {})
    if config.get("head_node_type") not in types:
        problems.append(f"{path}: head_node_type {config.get('head_node_type')!r} is not in available_node_types")
    for local in config.get("file_mounts", {}).values():
        if not (Path(repo) / local).exists():
            problems.append(f"{path}: file_mounts source {local!r} does not exist under {repo}")
    return problems


def launcher_gpus(path: str | Path) -> int:
    """GPUs the launcher config can scale to: each worker type's declared GPU resource x its max_workers, capped by
    the cluster's max_workers nodes."""
    config = yaml.safe_load(Path(path).read_text())
    head = config.get("head_node_type")
    per_node = sorted(
        (
            (t.get("resources", {}).get("GPU", 0), t.get("max_workers", 0))
            for n, t in config["available_node_types"].items()
            if n != head
        ),
        reverse=True,
    )
    nodes, gpus = config.get("max_workers", 0), 0
    for gpu, count in per_node:
        take = min(count, nodes)
        gpus, nodes = gpus + gpu * take, nodes - take
    return gpus


def _unknown(where: str, obj: dict[str, Any], known: set[str]) -> list[str]:
    return [f"{where}: unknown RayJob field {k!r}" for k in sorted(obj.keys() - known)]


def rayjob_problems(path: str | Path, repo: str | Path = ".") -> list[str]:
    """Where a KubeRay RayJob departs from the ray.io/v1 RayJob fields, has a worker group whose replicas fall
    outside [minReplicas, maxReplicas], or an entrypoint whose job or --config file is not in the repo."""
    job = yaml.safe_load(Path(path).read_text())
    problems = []
    if job.get("apiVersion") != "ray.io/v1" or job.get("kind") != "RayJob":
        problems.append(f"{path}: expected apiVersion ray.io/v1, kind RayJob")
    spec = job.get("spec", {})
    problems += _unknown(f"{path}: spec", spec, RAYJOB_FIELDS["spec"])
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        problems.append(f"{path}: spec.submissionMode {spec['submissionMode']!r}: expected one of {SUBMISSION_MODES}")
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        if key in spec and not (isinstance(spec[key], int) and spec[key] >= 0):
            problems.append(f"{path}: spec.{key} = {spec[key]!r}: expected an integer >= 0")
    if not isinstance(yaml.safe_load(spec.get("runtimeEnvYAML", "{}")), dict):
        problems.append(f"{path}: spec.runtimeEnvYAML is not a YAML mapping")
    words = shlex.split(spec.get("entrypoint", ""))
    for i, word in enumerate(words):
        if word.endswith(".py") or (i and words[i - 1] == "--config"):
            if not (Path(repo) / word).exists():
                problems.append(f"{path}: spec.entrypoint names {word}, which is not in the repository")
    cluster = spec.get("rayClusterSpec", {})
    problems += _unknown(f"{path}: spec.rayClusterSpec", cluster, RAYJOB_FIELDS["rayClusterSpec"])
    problems += _unknown(f"{path}: headGroupSpec", cluster.get("headGroupSpec", {}), RAYJOB_FIELDS["headGroupSpec"])
    for group in cluster.get("workerGroupSpecs", []):
        name = group.get("groupName", "?")
        problems += _unknown(f"{path}: workerGroupSpecs {name}", group, RAYJOB_FIELDS["workerGroupSpecs"])
        low, n, high = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 0)
        if not low <= n <= high:
            problems.append(f"{path}: workerGroupSpecs {name}: expected minReplicas <= replicas <= maxReplicas")
    return problems


def rayjob_gpus(path: str | Path) -> int:
    """GPUs the RayJob's worker groups can scale to: nvidia.com/gpu limit of each container x maxReplicas."""
    job = yaml.safe_load(Path(path).read_text())
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) * g.get("maxReplicas", 0)
        for g in job["spec"]["rayClusterSpec"].get("workerGroupSpecs", [])
        for c in g["template"]["spec"]["containers"]
    )


def capacity_problems(cfg: Config, gpus: int, where: str) -> list[str]:
    """Where a run asks for more GPUs at once than the cluster can scale to (`gpus`): the encoder pool at its max,
    or the training group at its max size."""
    problems = []
    r = cfg.resources
    if r.actor_gpus and r.pool_max * r.actor_gpus > gpus:
        problems.append(
            f"{where}: resources.pool_max = {r.pool_max} actors x actor_gpus = {r.actor_gpus} needs "
            f"{r.pool_max * r.actor_gpus:g} GPUs, the cluster scales to {gpus}"
        )
    if cfg.train.use_gpu and worker_range(cfg.train.num_workers)[1] > gpus:
        problems.append(
            f"{where}: train.num_workers = {cfg.train.num_workers} needs one GPU each, the cluster scales to {gpus}"
        )
    return problems
