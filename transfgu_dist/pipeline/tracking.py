"""MLflow tracking: the pipeline is a run, each stage a nested run with the full config, metrics and artifacts.

The tracking URI comes from `mlflow_uri`, else MLFLOW_TRACKING_URI, else a SQLite store under the output folder
(`mlflow ui --backend-store-uri sqlite:///<output>/mlflow.db` opens it). Artifacts of a run whose output is on S3
go to the bucket (see `artifact_root`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from transfgu_dist.config import Config, dump_yaml, to_dict
from transfgu_dist.io import s3, storage

log = logging.getLogger(__name__)
OUTPUT_TAG = "transfgu.output"  # the output folder a run wrote


def tracking_uri(cfg: Config) -> str:
    if cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return cfg.mlflow_uri or os.environ["MLFLOW_TRACKING_URI"]
    root = cfg.source or cfg.output  # a sweep or a reuse of a bank lands in the source run's store
    base = Path(root if "://" not in root else "outputs").resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


def flat_params(cfg: Config) -> dict[str, Any]:
    """The full config as `section.key` params."""
    out: dict[str, Any] = {}
    for k, v in to_dict(cfg).items():
        out.update({f"{k}.{kk}": vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
    return out


def artifact_root(cfg: Config, uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: `mlflow_artifacts`, else beside the run's outputs when they are
    on S3 (so a cluster run's pictures land in the bucket), else beside a SQLite store; None: the server decides."""
    root = cfg.source or cfg.output
    if cfg.mlflow_artifacts:
        return cfg.mlflow_artifacts
    if storage.is_s3(root):
        return storage.join(root, "mlflow-artifacts")
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def use_experiment(cfg: Config) -> str:
    """Point mlflow at the tracking store and the experiment, creating it with its artifact root if new."""
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    endpoint = s3.options().endpoint_url
    if endpoint:  # MLflow's S3 artifact store reaches the same S3-compatible endpoint as the pipeline
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)
    wanted = artifact_root(cfg, uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return mlflow.create_experiment(cfg.experiment, artifact_location=wanted)
    if wanted and storage.is_s3(wanted) and exp.artifact_location.rstrip("/") != wanted.rstrip("/"):
        log.warning(
            "MLflow experiment %r keeps its artifacts at %s, not %s: set experiment=<a new name> to keep "
            "this run's artifacts in the bucket",
            cfg.experiment,
            exp.artifact_location,
            wanted,
        )
    return exp.experiment_id


@contextmanager
def run(
    cfg: Config, name: str, nested: bool = False, run_id: str | None = None, sections: tuple[str, ...] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run; `run_id` continues an earlier one. A top-level run gets the full config as params and as
    `config.yaml`; a nested one only the keys of its stage's config `sections`. Ctrl-C marks the run KILLED."""
    experiment = use_experiment(cfg)
    with mlflow.start_run(run_id=run_id, experiment_id=experiment, run_name=name, nested=nested) as active:
        if run_id is None:
            mlflow.set_tag(OUTPUT_TAG, cfg.output)
            params = flat_params(cfg)
            if nested and sections is not None:
                params = {k: v for k, v in params.items() if k.split(".")[0] in sections}
            mlflow.log_params(params)
            if not nested:
                mlflow.log_text(dump_yaml(cfg), "config.yaml")
        try:
            yield active
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise


def close_orphans(cfg: Config, quiet: bool = False) -> list[str]:
    """Mark KILLED the runs of `cfg.output` still RUNNING: their drivers were killed (the caller holds the output's
    lease, so no live driver owns them), or this driver is being cut short after Ctrl-C (`quiet`: no warning).
    Returns their ids."""
    experiment = use_experiment(cfg)
    client = MlflowClient(tracking_uri(cfg))
    output = cfg.output.replace("'", "\\'")
    runs = client.search_runs([experiment], f"tags.`{OUTPUT_TAG}` = '{output}' and attributes.status = 'RUNNING'")
    for r in runs:
        client.set_terminated(r.info.run_id, "KILLED")
    if runs and not quiet:
        log.warning("MLflow: marked %d runs of %s left RUNNING by killed drivers as KILLED", len(runs), cfg.output)
    return [r.info.run_id for r in runs]


EPOCH_COUNTERS = {"round", "epoch", "global_epoch", "steps", "resumed_at", "group_started_at"}


def log_epoch(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Per-epoch metrics from a training worker (no active run there), named as reported (`val/miou`, the name
    the sweeps use too) at step = the global epoch; counters (round, epoch, steps) are not metrics."""
    now = int(time.time() * 1000)
    numbers = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and k.split("/")[-1] not in EPOCH_COUNTERS
    ]
    MlflowClient(uri).log_batch(run_id, metrics=numbers)


def log_outputs(uri: str, artifact_path: str, suffixes: tuple[str, ...] = (".json", ".png", ".md")) -> None:
    """Copy a stage's result files (local or s3://) into the active run's artifacts."""
    with tempfile.TemporaryDirectory() as d:
        for f in storage.list_files(uri, suffixes):
            if f.endswith("_SUCCESS.json"):  # the stage's commit marker, not a result
                continue
            local = Path(d) / f[len(uri) :].strip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(storage.read_bytes(f))
        mlflow.log_artifacts(d, artifact_path)
