"""Where MLflow keeps a run's artifacts, against a real SQLite tracking store."""

from __future__ import annotations

import logging

import mlflow

from transfgu_dist.config import load_config
from transfgu_dist.pipeline import tracking


def test_artifact_root_follows_the_output(tmp_path):
    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = load_config(overrides=[f"output={tmp_path / 'run'}"])
    assert tracking.artifact_root(local, sqlite) == (tmp_path / "mlartifacts").as_uri()
    assert tracking.artifact_root(local, "http://127.0.0.1:5000") is None  # a tracking server decides
    on_s3 = load_config(overrides=["output=s3://bucket/runs/a"])
    assert tracking.artifact_root(on_s3, sqlite) == "s3://bucket/runs/a/mlflow-artifacts"
    reuse = load_config(overrides=["output=/tmp/sweep", "source=s3://bucket/runs/a"])  # a sweep lands in its source
    assert tracking.artifact_root(reuse, sqlite) == "s3://bucket/runs/a/mlflow-artifacts"
    chosen = load_config(overrides=["output=s3://bucket/runs/a", "mlflow_artifacts=s3://other/art"])
    assert tracking.artifact_root(chosen, sqlite) == "s3://other/art"


def test_existing_experiment_elsewhere_is_reported(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = load_config(overrides=[f"output={tmp_path / 'run'}", f"mlflow_uri={uri}"])
    first = tracking.use_experiment(local)
    assert mlflow.get_experiment(first).artifact_location == (tmp_path / "mlartifacts").as_uri()
    on_s3 = load_config(overrides=["output=s3://bucket/run", f"mlflow_uri={uri}"])
    with caplog.at_level(logging.WARNING, logger="transfgu_dist.pipeline.tracking"):
        assert tracking.use_experiment(on_s3) == first
    assert "keeps its artifacts at" in caplog.text and "s3://bucket/run/mlflow-artifacts" in caplog.text


def test_runs_left_running_by_a_killed_driver_are_marked_killed(tmp_path):
    """A killed driver leaves its runs RUNNING (created, never terminated); the next driver of that output ends
    them as KILLED and leaves other outputs' runs alone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(overrides=[f"output={tmp_path / 'run'}", f"mlflow_uri={uri}"])
    client = mlflow.tracking.MlflowClient(uri)
    exp = tracking.use_experiment(cfg)
    ids = {
        name: client.create_run(exp, tags={tracking.OUTPUT_TAG: str(tmp_path / out)}).info.run_id
        for name, out in (("killed", "run"), ("finished", "run"), ("elsewhere", "other"))
    }
    client.set_terminated(ids["finished"])
    with tracking.run(cfg, "tagged") as active:  # the fluent runs carry the tag
        assert client.get_run(active.info.run_id).data.tags[tracking.OUTPUT_TAG] == cfg.output
    assert tracking.close_orphans(cfg) == [ids["killed"]]
    status = {k: client.get_run(v).info.status for k, v in ids.items()}
    assert status == {"killed": "KILLED", "finished": "FINISHED", "elsewhere": "RUNNING"}
    assert tracking.close_orphans(cfg) == []
