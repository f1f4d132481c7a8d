"""Search-space files, and a real Ray Tune sweep tracked in a real MLflow store, interrupted and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import SMALL, job

from transfgu_dist.config import ConfigError, load_config
from transfgu_dist.pipeline.sweep import TUNABLE, load_spec

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "tune_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_shipped_spaces_hold_the_paper_values(path):
    spec = load_spec(path)
    load_config(preset=spec.preset, overrides=[f"{k}={v}" for k, v in spec.trial.items()])
    paper = {"loss.omega1": 1.0, "loss.omega2": 0.3, "loss.t_bg": 0.1, "loss.alpha": 0.03}
    for key, value in paper.items():
        ((kind, args),) = spec.raw_space[key].items()
        assert kind in ("uniform", "loguniform") and args[0] <= value <= args[1], (path.name, key)


@pytest.mark.parametrize(
    "space,message",
    [
        ({"loss.beta": {"uniform": [0, 1]}}, r"bad\.yaml: unknown parameter 'space.loss.beta'"),
        ({"loss.alpha": {"uniform": [0.3, 0.1]}}, r"bad\.yaml: key 'space.loss.alpha': empty range \[0.3, 0.1\]"),
        ({"loss.t_bg": {"choice": []}}, r"bad\.yaml: key 'space.loss.t_bg': choice needs a non-empty list"),
        ({"loss.omega1": {"normal": [0, 1]}}, r"bad\.yaml: key 'space.loss.omega1': expected one of"),
        ({}, r"bad\.yaml: key 'space' is empty"),
    ],
)
def test_bad_space_files_are_named(tmp_path, space, message):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"preset": "synthetic", "space": space}))
    with pytest.raises(ConfigError, match=message):
        load_spec(f)
    assert set(TUNABLE) >= {"loss.alpha", "loss.omega1", "loss.omega2", "loss.t_bg"}


@pytest.mark.slow
def test_sweep_resumes_and_tracks_trials_in_mlflow(e2e_run, tmp_path):
    source = e2e_run  # its committed bank: no trial re-extracts
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "preset": "synthetic",
                "trial": {"train.round_epochs": [1]},
                "space": {
                    "loss.alpha": {"loguniform": [0.01, 0.3]},
                    "loss.omega1": {"uniform": [0.0, 2.0]},
                    "loss.omega2": {"uniform": [0.0, 1.0]},
                    "loss.t_bg": {"uniform": [0.02, 0.3]},
                },
                # grace_period past the last epoch: no ASHA stop here (a trial stopped mid-epoch can leave its Ray Data
                # reservation held on Ray 2.60 and starve the next trial on a 2-CPU machine; see the README)
                "search": {"num_samples": 3, "max_concurrent_trials": 1, "grace_period": 3},
            }
        )
    )
    out = tmp_path / "sweep"
    args = [
        sys.executable,
        str(ROOT / "jobs" / "sweep.py"),
        str(space),
        f"--source={source}",
        f"--output={out}",
        *SMALL,
        "train.cpus_per_worker=0.5",
    ]
    # stop the driver once a trial has finished, then rerun: finished trials must not run again
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    done = lambda: sorted(out.glob("trials/*/trial.json"))  # noqa: E731
    try:
        deadline = time.time() + 900
        while not done() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = {p: p.stat().st_mtime_ns for p in done()}
    assert first and not (out / "best.yaml").exists()
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, timeout=1200)
    assert {p: p.stat().st_mtime_ns for p in first} == first
    assert len(done()) == 3

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{source / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("transfgu-dist").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    reported = {(t := json.loads(p.read_text()))["params"]["loss.alpha"]: t["metrics"]["val/miou"] for p in done()}
    assert len(children) == 3  # a trial restarted by Tuner.restore continues its run (sweep.TrialRuns)
    finished = [r for r in children if "val/miou" in r.data.metrics]
    assert len({r.data.params["loss.alpha"] for r in finished}) == 3 == len(reported)
    for r in finished:  # each trial's MLflow run holds the val mIoU its trial.json reports
        assert {"loss.alpha", "loss.omega1", "loss.omega2", "loss.t_bg"} <= set(r.data.params)
        assert r.data.metrics["val/miou"] == reported[float(r.data.params["loss.alpha"])]

    best = load_config(out / "best.yaml")
    assert best.source == str(source) and best.output == str(out / "best")
    log = job("run_all", "--config", str(out / "best.yaml"), "train.round_epochs=[1]")
    assert "mIoU" in log and (out / "best" / "evaluate" / "metrics.json").exists()


def test_sweep_refuses_a_source_bank_made_with_other_settings(e2e_run, tmp_path):
    space = ROOT / "tune_spaces" / "synthetic.yaml"
    changed = [a if not a.startswith("crops.crop_size=") else "crops.crop_size=16" for a in SMALL]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "sweep.py"),
            str(space),
            f"--source={e2e_run}",
            f"--output={tmp_path / 'sweep'}",
            *changed,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "crops.crop_size: 32 -> 16" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "sweep").exists()
