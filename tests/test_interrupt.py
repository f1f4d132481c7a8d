"""Ctrl-C during a run: one line (what was kept, the command that resumes), exit 130 within seconds, runs KILLED,
the output's lease released."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SMALL

pytestmark = pytest.mark.slow


def test_ctrl_c_is_one_line_exit_130_and_marks_the_runs_killed(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, f"{ROOT}/jobs/run_all.py", f"output={out}", *SMALL],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        console = []
        for line in proc.stdout:
            console.append(line)
            if "stage bootstrap: starting" in line:
                break
        time.sleep(3)  # training has started
        sent = time.perf_counter()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C on a terminal sends
        rest, _ = proc.communicate(timeout=60)
        seconds = time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    after = [x for x in rest.splitlines() if x.strip()]
    assert proc.returncode == 130 and seconds < 15, (proc.returncode, seconds, rest)
    said = [x for x in after if x.startswith("interrupted: ")]
    assert len(said) == 1 and "Traceback" not in rest, rest
    assert said[0].startswith("interrupted: kept the committed stages (extract, cluster, pseudo_label)"), said
    assert f"resume with: {sys.executable} {ROOT}/jobs/run_all.py output={out}" in said[0], said
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    status = {r.info.run_name: r.info.status for r in runs}
    assert status["run_all"] == "KILLED" and status["bootstrap"] == "KILLED", status
    assert status["extract"] == "FINISHED", status
    assert not (out / "_LEASE.json").exists()  # released: a rerun resumes at once
