"""The whole pipeline on a real local Ray, run the way users run it: `python jobs/<stage>.py ...` processes.

One end-to-end run is shared; the resume, failure, DDP and `ray job submit` tests reuse its data and outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import E2E, SMALL, free_port, job

from transfgu_dist.config import ARCHS, load_config
from transfgu_dist.io.parts import list_values, read_table, write_part
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.method.decoder import MaskTransformer
from transfgu_dist.pipeline.stages.bootstrap import FAULT_ENV

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def parquet_files(d: Path) -> list[Path]:
    return sorted(d.glob("part-*.parquet"))


@pytest.fixture(scope="module")
def run_dir(e2e_run) -> Path:
    return e2e_run


def test_end_to_end_outputs(run_dir):
    cfg = load_config(overrides=SMALL)
    K, d = cfg.n_concepts, 48
    # extract: committed Parquet with the promised schema
    features = read_table([str(p) for p in parquet_files(run_dir / "features")])
    assert (run_dir / "features" / "_SUCCESS.json").exists()
    schema = pq.read_schema(parquet_files(run_dir / "features")[0])
    assert schema.names == ["image_id", "beta", "box", "fg_fraction", "is_fg", "feature"]
    assert schema.field("feature").type == pa.list_(pa.float32(), d)  # crops.feature_dtype: float32 by default
    assert features.num_rows > 0 and set(features.column("image_id").to_pylist()) <= {f"{i:06d}" for i in range(12)}
    assert set(np.unique(features.column("beta").to_numpy())) <= set(np.float32(cfg.crops.betas))
    # cluster: K concepts of width d, foreground first
    with np.load(run_dir / "concepts" / "concepts.npz") as c:
        assert c["centroids"].shape == (K, d) and c["is_fg"].tolist() == [True] * 4 + [False] * 4
    # pseudo-label bank: one row per training image, maps stored as shared fp32 + fp32 terms (pseudo.terms_dtype)
    bank = read_table([str(p) for p in parquet_files(run_dir / "bank")])
    assert bank.num_rows == 12
    terms = list_values(bank.column("terms"), (K, 8, 8))
    assert terms.dtype == np.float32 and np.nanmax(np.abs(terms)) <= 1 and not np.isinf(terms).any()
    assert list_values(bank.column("shared"), (8, 8)).dtype == np.float32
    assert list_values(bank.column("fg_prior"), (8, 8)).dtype == bool
    # bootstrap: a checkpoint per round and the final one
    for name in ("round-0.pt", "round-1.pt", "final.pt"):
        ckpt = torch.load(run_dir / "bootstrap" / name, weights_only=True)
        assert ckpt["n_outputs"] == K and ckpt["decoder"]["cls_emb"].shape == (1, K, d)
    # evaluate: metrics and pictures
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 1 and metrics["n_images"] == 6
    assert (run_dir / "evaluate" / "confusion.png").exists() and list((run_dir / "evaluate" / "overlays").glob("*.png"))


def test_table3_report(run_dir):
    """evaluate reports the paper's Table 3 figures beside its own: bank argmax, round-0 student, student."""
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    t = metrics["table3"]
    assert t["student"] == metrics["miou"] and 0 < t["pseudo_labels"] <= 1 and 0 < t["round0_student"] <= 1
    line = next(x for x in (run_dir / "console.log").read_text().splitlines() if x.startswith("Table 3 mIoU: "))
    assert f"-> student {100 * metrics['miou']:.2f}" in line and f"pseudo labels {100 * t['pseudo_labels']:.2f}" in line


def test_mlflow_tracks_every_stage(run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("transfgu-dist").experiment_id])
    parent = min((r for r in runs if r.info.run_name == "run_all"), key=lambda r: r.info.start_time)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"extract", "cluster", "pseudo_label", "bootstrap", "evaluate"}
    assert parent.data.params["crops.crop_size"] == "32" and parent.data.tags["weights"] == "random"
    assert children["bootstrap"].data.params["loss.omega2"] == "0.3"
    assert not any(k.startswith(("crops.", "data.")) for k in children["bootstrap"].data.params)  # its keys only
    history = client.get_metric_history(children["bootstrap"].info.run_id, "val/miou")
    assert [m.step for m in history] == [0, 1]
    assert not {"round", "epoch", "steps"} & set(children["bootstrap"].data.metrics)
    evaluate = children["evaluate"]
    assert 0 <= evaluate.data.metrics["miou"] <= 1
    files = {a.path for a in client.list_artifacts(evaluate.info.run_id, "evaluate")}
    assert {"evaluate/metrics.json", "evaluate/confusion.png", "evaluate/per_class_iou.png"} <= files
    assert "evaluate/_SUCCESS.json" not in files
    assert children["bootstrap"].data.tags["checkpoint"].endswith("bootstrap/final.pt")


def test_rerun_skips_committed_stages(run_dir, shared_ray):
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")}
    log = job("run_all", f"output={run_dir}", *E2E, env={"RAY_ADDRESS": shared_ray})
    assert "mIoU" in log
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")} == before


def test_extract_resumes_after_kill(run_dir, tmp_path):
    """Kill extraction once its first part is committed; the rerun finishes the rest with the same rows."""
    out = tmp_path / "killed"
    args = [sys.executable, str(ROOT / "jobs" / "extract.py"), f"output={out}", f"data.root={run_dir / 'data'}", *SMALL]
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 240
        while not parquet_files(out / "features") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in parquet_files(out / "features")}
    assert first and not (out / "features" / "_SUCCESS.json").exists(), "the kill came too late to test a resume"
    # a second attempt had batched one of those images on its own: the commit keeps the image once
    part = next(
        t
        for t in (read_table([str(out / "features" / n)]) for n in sorted(first))
        if len(set(t.column("image_id").to_pylist())) > 1
    )
    one = part.column("image_id")[0].as_py()
    twice = write_part(
        StageOutput(str(out / "features")), part.filter(pc.equal(part.column("image_id"), one)), [one], []
    )
    job("extract", f"output={out}", f"data.root={run_dir / 'data'}", *SMALL)
    assert (out / "features" / "_SUCCESS.json").exists()
    assert {n: (out / "features" / n).stat().st_mtime_ns for n in first} == first  # committed parts not redone
    assert not (out / "features" / twice).exists()
    key = ["image_id", "beta", "box"]
    resumed = read_table([str(p) for p in parquet_files(out / "features")]).sort_by([("image_id", "ascending")])
    clean = read_table([str(p) for p in parquet_files(run_dir / "features")]).sort_by([("image_id", "ascending")])
    rows = lambda t: sorted(zip(*(t.column(k).to_pylist() for k in key)))  # noqa: E731
    assert rows(resumed) == rows(clean)


def copy_bank(run_dir: Path, dst: Path) -> Path:
    for stage in ("data", "features", "concepts", "bank"):
        shutil.copytree(run_dir / stage, dst / stage)
    return dst


def refused(stage: str, *args: str) -> str:
    """Run a job that must be refused before Ray starts: exit status 2 and one line on the console."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / f"{stage}.py"), *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=120,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return errors[0]


def test_changed_settings_are_refused_without_config_yaml_and_through_source(run_dir, tmp_path):
    """One stage rerun with one changed setting on a copy of the shared run with config.yaml deleted, and a run
    reusing that copy through source=: refused in one line naming the key, nothing written."""
    out = copy_bank(run_dir, tmp_path / "copy")
    before = sorted(p for p in out.rglob("*"))
    line = refused("pseudo_label", f"output={out}", *SMALL, "pseudo.similarity=dot")
    assert f"{out / 'bank'}: committed results made with other settings (pseudo.similarity: cosine -> dot)" in line
    line = refused("run_all", f"output={tmp_path / 'best'}", f"source={out}", *SMALL, "cluster.niter=3")
    assert f"{out / 'concepts'}: committed results made with other settings (cluster.niter: " in line
    assert sorted(p for p in out.rglob("*")) == before and not (tmp_path / "best" / "config.yaml").exists()


def test_two_drivers_a_worker_failure_and_a_driver_kill_resume_equals_the_uninterrupted_run(run_dir, tmp_path):
    """Two bootstrap drivers started at once on one output: one holds it, the other exits at the lease in one line.
    A worker of the holder crashes at the start of epoch 1, so only epoch 0's checkpoint can be registered: once it
    is, the holder's process group and its local Ray are SIGKILLed. The rerun takes over the stale lease and resumes
    from that checkpoint (never from scratch); there a worker crashes once more at epoch 1 and Ray Train restarts the
    group from the same checkpoint, with the RNG streams (dropout, augmentations) and best state restored. Every
    decoder is bit-identical to the shared uninterrupted run's, final.pt and best.pt byte-identical."""
    out = copy_bank(run_dir, tmp_path / "killed")
    args = [sys.executable, str(ROOT / "jobs" / "bootstrap.py"), f"output={out}", *SMALL]
    env = {**os.environ, FAULT_ENV: f"1:{tmp_path / 'crashed-in-the-killed-run'}"}
    procs = [
        subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
        )
        for _ in range(2)
    ]
    snapshot = out / "ray_train" / "bootstrap" / "checkpoint_manager_snapshot.json"

    def registered() -> list[str]:
        try:
            return [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (OSError, ValueError, KeyError):
            return []

    try:
        deadline = time.time() + 300
        while not registered() and time.time() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                for session in Path("/tmp/ray").glob(f"session_*_{p.pid}"):  # its Ray's own process groups
                    stop_cluster(session.name)
    logs = [p.communicate()[0] for p in procs]
    lost = [i for i, p in enumerate(procs) if p.returncode == 2]
    assert len(lost) == 1, logs
    errors = [line for line in logs[lost[0]].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "output held by another driver" in errors[0], logs[lost[0]]
    time.sleep(2)  # a checkpoint the dying Ray was still writing lands now
    before = registered()
    assert len(before) == 1 and not (out / "bootstrap" / "_SUCCESS.json").exists(), before
    crashed = tmp_path / "crashed-in-the-rerun"
    job("bootstrap", f"output={out}", *SMALL, env={FAULT_ENV: f"1:{crashed}"})
    assert crashed.exists()
    resumed, clean = (json.loads((d / "bootstrap" / "_SUCCESS.json").read_text()) for d in (out, run_dir))
    assert len(set(registered()) - set(before)) == 1  # only epoch 1 ran again
    assert resumed["metrics"]["resumed_at"] == 1 and clean["metrics"]["resumed_at"] == 0
    assert resumed["metrics"]["val/miou"] == clean["metrics"]["val/miou"]
    assert (resumed["best_epoch"], resumed["best_miou"]) == (clean["best_epoch"], clean["best_miou"])
    for name in ("round-0.pt", "round-1.pt", "final.pt", "best.pt"):
        one = torch.load(run_dir / "bootstrap" / name, weights_only=True)["decoder"]
        two = torch.load(out / "bootstrap" / name, weights_only=True)["decoder"]
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one), name
    for name in ("final.pt", "best.pt"):
        assert (out / "bootstrap" / name).read_bytes() == (run_dir / "bootstrap" / name).read_bytes(), name
    # best.pt is the decoder of the epoch the manifest names (round-r.pt is the student after round r's epoch)
    best = torch.load(out / "bootstrap" / "best.pt", weights_only=True)
    at_epoch = torch.load(out / "bootstrap" / f"round-{resumed['best_epoch']}.pt", weights_only=True)
    assert best["round"] == resumed["best_epoch"]
    assert all(torch.equal(best["decoder"][k], at_epoch["decoder"][k]) for k in best["decoder"])


def stop_cluster(temp_dir: str) -> None:
    """Kill only the Ray processes of the cluster started with `temp_dir` (`ray stop` would kill every Ray here)."""
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if temp_dir in proc.read_text(errors="ignore"):
                os.kill(int(proc.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_ray_job_submit_paper_profile_end_to_end(run_dir, tmp_path):
    """`ray start --head`, then `ray job submit -- python jobs/run_all.py --profile paper`: every stage runs. Its
    bootstrap trains 2 DDP workers (gloo); one crashes once at epoch 1 (the cluster's environment reaches every
    worker) and the group restarts from the epoch-0 checkpoint."""
    out = tmp_path / "submitted"
    crashed = tmp_path / "crashed"
    bin_dir = str(Path(sys.executable).parent)
    ray_bin = os.path.join(bin_dir, "ray")
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    env = {
        **os.environ,
        "RAY_ADDRESS": "",
        "RAY_AUTH_MODE": "token",  # Ray >= 2.5x: token auth by default
        "PATH": f"{bin_dir}:{os.environ['PATH']}",  # the job's `python` is this environment's
        "RAY_idle_worker_killing_time_threshold_ms": "60000",
        FAULT_ENV: f"1:{crashed}",
    }  # as init_ray's local Ray (stages.common)
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={temp_dir}",
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=180,
    )
    try:
        for _ in range(30):  # the job agent comes up a little after the head
            proc = subprocess.run(
                [
                    ray_bin,
                    "job",
                    "submit",
                    f"--address=http://127.0.0.1:{dash}",
                    "--working-dir",
                    ".",
                    "--runtime-env",
                    "cluster/runtime_env.yaml",
                    "--",
                    "python",
                    "jobs/run_all.py",
                    "--profile",
                    "paper",
                    f"output={out}",
                    f"data.root={run_dir / 'data'}",
                    *SMALL,
                    "train.num_workers=2",
                    "train.cpus_per_worker=0.5",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
            )
            if "No available agent" not in proc.stdout + proc.stderr:
                break
            time.sleep(5)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "mIoU" in proc.stdout and "succeeded" in proc.stdout
        for stage in ("features", "concepts", "bank", "bootstrap", "evaluate"):
            assert (out / stage / "_SUCCESS.json").exists(), stage
        cfg = load_config(out / "config.yaml")
        assert cfg.pseudo.response == "paper"
        manifest = json.loads((out / "bootstrap" / "_SUCCESS.json").read_text())
        assert crashed.exists() and manifest["workers"] == 2 and manifest["metrics"]["resumed_at"] == 1
        shapes = {
            k: v.shape
            for k, v in MaskTransformer(ARCHS[cfg.encoder.arch][1], cfg.n_outputs, cfg.decoder).state_dict().items()
        }
        for name in ("round-0.pt", "round-1.pt"):  # the plain decoder's weights, not DDP's wrapper
            decoder = torch.load(out / "bootstrap" / name, weights_only=True)["decoder"]
            assert {k: v.shape for k, v in decoder.items()} == shapes, name
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
