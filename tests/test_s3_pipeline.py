"""Object storage end to end against a REAL S3-compatible server (moto on 127.0.0.1, conftest.s3_server).

The synthetic dataset (plus one corrupt image) is staged with `jobs/stage_dataset.py`, then the whole pipeline
runs as `python jobs/run_all.py output=s3://... data.root=s3://...` (Ray Train checkpoints and MLflow artifacts on S3
too); it must give exactly what the same run on local paths (conftest.e2e_run) gave. Wrong credentials, a missing
bucket and a corrupt image each give their promised message.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, boto3_s3
from test_storage import auth_s3_server  # noqa: F401  (fixture: a second moto server that checks credentials)

from transfgu_dist.config import load_config
from transfgu_dist.io import s3, storage
from transfgu_dist.io.datasets import list_samples
from transfgu_dist.io.storage_errors import StorageError

ROOT = Path(__file__).resolve().parents[1]
CORRUPT = "zz_corrupt"  # a train image that is not an image: sorted last, so the other batches are unchanged


def stage_dataset(
    src: Path | str,
    dst: str,
    *args: str,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "stage_dataset.py"), str(src), dst, *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def dataset(e2e_run, tmp_path_factory) -> Path:
    """The shared local run's synthetic data (conftest.e2e_run) plus one corrupt train image."""
    root = tmp_path_factory.mktemp("staged") / "data"
    shutil.copytree(e2e_run / "data", root)
    (root / "images" / "train" / f"{CORRUPT}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated, not an image")
    return root


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    name = f"pipe-{uuid.uuid4().hex[:10]}"
    boto3_s3(s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def runs(e2e_run, dataset, bucket, tmp_path_factory) -> dict:
    """Stage the dataset with jobs/stage_dataset.py, then run the whole pipeline with every path on S3. The
    local-path run with the same settings is conftest.e2e_run (shared with the other end-to-end tests)."""
    proc = stage_dataset(dataset, f"{bucket}/data", "--workers", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tmp = tmp_path_factory.mktemp("s3run")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    with (tmp / "run_all.log").open("w") as log:
        p = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "jobs" / "run_all.py"),
                f"output={bucket}/run",
                f"data.root={bucket}/data",
                *SMALL,
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # its own group: killable with its Ray
        try:
            rc = p.wait(timeout=900)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    text = (tmp / "run_all.log").read_text()
    assert rc == 0, f"the S3 run failed:\n{text[-8000:]}"
    return {
        "stage_log": proc.stderr,
        "log": text,
        "local": e2e_run,
        "s3": f"{bucket}/run",
        "mlflow": env["MLFLOW_TRACKING_URI"],
    }


@pytest.mark.slow
def test_stage_dataset_upload_manifest_and_resume(runs, dataset, bucket):
    files = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file())
    assert f"{len(files)} files, 0 already there" in runs["stage_log"]
    manifest = storage.read_json(f"{bucket}/data/_MANIFEST.json")
    assert sorted(manifest["files"]) == files and manifest["n_files"] == len(files)
    assert all(manifest["files"][f] == (dataset / f).stat().st_size for f in files)
    client = boto3_s3(os.environ["AWS_ENDPOINT_URL_S3"])
    name = bucket[len("s3://") :]
    sizes = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=name, Prefix="data/")["Contents"]}
    assert {f"data/{f}": (dataset / f).stat().st_size for f in files}.items() <= sizes.items()
    # resume: one object removed and one changed in size -> only those two are uploaded again
    client.delete_object(Bucket=name, Key="data/images/val/000012.png")
    client.put_object(Bucket=name, Key="data/labels/val/000013.png", Body=b"short")
    proc = stage_dataset(dataset, f"{bucket}/data", "--workers", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(files)} files, {len(files) - 2} already there (same size), uploading 2" in proc.stderr
    assert (
        storage.read_bytes(f"{bucket}/data/labels/val/000013.png") == (dataset / "labels/val/000013.png").read_bytes()
    )


@pytest.mark.slow
def test_stage_dataset_multipart(s3_server, bucket, tmp_path):
    """A file above --chunk-mb goes up as a multipart upload (2 parts: 5 MiB and the rest) and arrives whole."""
    big = tmp_path / "src" / "big.bin"
    big.parent.mkdir()
    payload = np.random.default_rng(0).integers(0, 256, 6 * (1 << 20) + 123, dtype=np.uint8).tobytes()
    big.write_bytes(payload)
    proc = stage_dataset(big.parent, f"{bucket}/multipart", "--chunk-mb", "5")
    assert proc.returncode == 0, proc.stderr
    head = boto3_s3(s3_server).head_object(Bucket=bucket[len("s3://") :], Key="multipart/big.bin")
    assert head["ContentLength"] == len(payload) and head["ETag"].strip('"').endswith("-2")  # a 2-part upload
    assert storage.read_bytes(f"{bucket}/multipart/big.bin") == payload


@pytest.mark.slow
def test_pipeline_outputs_in_the_bucket(runs):
    out = runs["s3"]
    for key in (
        "config.yaml",
        "features/_SUCCESS.json",
        "concepts/concepts.npz",
        "bank/_SUCCESS.json",
        "bootstrap/round-0.pt",
        "bootstrap/final.pt",
        "evaluate/metrics.json",
        "evaluate/_SUCCESS.json",
        "evaluate/confusion.png",
    ):
        assert storage.exists(storage.join(out, key)), key
    assert storage.list_files(storage.join(out, "bank"), (".parquet",))
    # Ray Train's checkpoints went through storage.ray_storage to the same bucket
    ckpts = [u for u in storage.list_files(storage.join(out, "ray_train")) if u.endswith("/state.pt")]
    assert ckpts and all("/bootstrap/checkpoint_" in u for u in ckpts), ckpts
    state = torch.load(io.BytesIO(storage.read_bytes(ckpts[-1])), weights_only=False)
    assert {"student", "optimizer", "round", "epoch"} <= state.keys()
    assert not (ROOT / "s3:").exists()  # nothing of the S3 run went to a local folder named like the URI


@pytest.mark.slow
def test_s3_run_matches_local_run(runs):
    local = json.loads((runs["local"] / "evaluate" / "metrics.json").read_text())
    remote = storage.read_json(storage.join(runs["s3"], "evaluate", "metrics.json"))
    assert remote["n_images"] == local["n_images"] == 6
    assert abs(remote["miou"] - local["miou"]) <= 1e-6, (remote["miou"], local["miou"])
    assert abs(remote["pixel_accuracy"] - local["pixel_accuracy"]) <= 1e-6
    for name, iou in local["per_class_iou"].items():
        assert np.isclose(remote["per_class_iou"][name], iou, atol=1e-6, equal_nan=True), name
    # the intermediate results agree too: same crops, the same concepts, the same final decoder
    with (
        np.load(runs["local"] / "concepts" / "concepts.npz") as a,
        np.load(io.BytesIO(storage.read_bytes(storage.join(runs["s3"], "concepts", "concepts.npz")))) as b,
    ):
        assert np.array_equal(a["centroids"], b["centroids"])
    one = torch.load(runs["local"] / "bootstrap" / "final.pt", weights_only=True)["decoder"]
    two = torch.load(
        io.BytesIO(storage.read_bytes(storage.join(runs["s3"], "bootstrap", "final.pt"))), weights_only=True
    )["decoder"]
    assert all(torch.equal(one[k], two[k]) for k in one), [k for k in one if not torch.equal(one[k], two[k])]


@pytest.mark.slow
def test_corrupt_image_is_skipped_counted_and_listed(runs):
    out = runs["s3"]
    for stage in ("features", "bank"):
        lines = storage.read_bytes(storage.join(out, stage, "bad_images.txt")).decode().splitlines()
        listed = [line.split("\t")[0] for line in lines]
        assert listed == [f"{out.rsplit('/', 1)[0]}/data/images/train/{CORRUPT}.png"]  # the file's path, a reason
        manifest = storage.read_json(storage.join(out, stage, "_SUCCESS.json"))
        assert manifest["bad_images"] == [CORRUPT] and manifest["images"] == 12
    # the per-image reason is a worker log line (off the quiet console; its text is pinned in-process below)
    for stage in ("features", "bank"):
        assert (
            f"{out}/{stage}: skipped 1 unreadable images of 13 (listed in {out}/{stage}/bad_images.txt)" in runs["log"]
        )


# ------------------------------------------------------------------------------------------ error messages


def test_missing_bucket_messages(s3_bucket, tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    proc = stage_dataset(tmp_path, "s3://no-such-bucket-transfgu/data")
    assert proc.returncode == 1
    assert (
        "stage_dataset: error: s3://no-such-bucket-transfgu/data: bucket 'no-such-bucket-transfgu' does not "
        "exist (endpoint http://127.0.0.1:" in proc.stderr
    ), proc.stderr
    cfg = load_config(overrides=["data.root=s3://no-such-bucket-transfgu/data"])
    with pytest.raises(
        StorageError,
        match=r"^s3://no-such-bucket-transfgu/data/images/train: bucket "
        r"'no-such-bucket-transfgu' does not exist",
    ):
        list_samples(cfg, "train")


def test_wrong_credentials_messages(auth_s3_server, tmp_path, monkeypatch):  # noqa: F811
    (tmp_path / "a.png").write_bytes(b"x")
    wrong = {
        "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1",
        "AWS_SECRET_ACCESS_KEY": "wrong-secret",
        "AWS_ENDPOINT_URL_S3": auth_s3_server,
        "AWS_ENDPOINT_URL": auth_s3_server,
    }
    proc = stage_dataset(tmp_path, "s3://some-bucket/data", env=wrong)
    assert proc.returncode == 1
    assert (
        "stage_dataset: error: s3://some-bucket/data: access denied while trying to list the objects already "
        f"there (endpoint {auth_s3_server}): check the AWS credentials" in proc.stderr
    ), proc.stderr
    for k, v in wrong.items():
        monkeypatch.setenv(k, v)
    s3.configure(None)
    cfg = load_config(overrides=["data.root=s3://some-bucket/data", "preset=cocostuff27"])
    with pytest.raises(
        StorageError,
        match=r"^s3://some-bucket/data/images/train2017: access denied .*"
        r"check the AWS credentials",
    ):
        list_samples(cfg, "train")


def test_corrupt_image_message_on_s3(s3_bucket):
    """The image loader flags a corrupt S3 object (and a missing one) with a message naming it, never raising."""
    from transfgu_dist.io.image_pool import load_images

    good = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good, format="PNG")
    storage.write_bytes(f"{s3_bucket}/ok.png", good.getvalue())
    storage.write_bytes(f"{s3_bucket}/bad.png", b"GIF89a not really")
    uris = [f"{s3_bucket}/ok.png", f"{s3_bucket}/bad.png", f"{s3_bucket}/gone.png"]
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("transfgu_dist.io.image_pool").addHandler(handler)
    try:
        out = load_images({"image_id": np.array(["ok", "bad", "gone"]), "uri": np.array(uris)}, (4, 4))
    finally:
        logging.getLogger("transfgu_dist.io.image_pool").removeHandler(handler)
    assert out["ok"].tolist() == [True, False, False] and out["image"].shape == (3, 4, 4, 3)
    assert any(m.startswith(f"skipping image: {s3_bucket}/bad.png: expected an RGB-convertible image") for m in records)
    assert any(m.startswith(f"skipping image: {s3_bucket}/gone.png: does not exist") for m in records), records


@pytest.mark.slow
def test_mlflow_artifacts_in_the_bucket(runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs["mlflow"])
    experiment = client.get_experiment_by_name("transfgu-dist")
    assert experiment.artifact_location == f"{runs['s3']}/mlflow-artifacts"
    (evaluate,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'evaluate'")
    assert evaluate.info.artifact_uri.startswith(f"{runs['s3']}/mlflow-artifacts/")
    # logged through MLflow's own S3 client (MLFLOW_S3_ENDPOINT_URL from the pipeline's endpoint), read back by ours
    metrics = storage.read_json(f"{evaluate.info.artifact_uri}/evaluate/metrics.json")
    assert metrics == storage.read_json(storage.join(runs["s3"], "evaluate", "metrics.json"))
    assert storage.exists(f"{evaluate.info.artifact_uri}/evaluate/confusion.png")
