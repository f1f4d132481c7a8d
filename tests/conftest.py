"""Shared fixtures.

S3 tests run against a REAL S3-compatible HTTP server: moto's ``ThreadedMotoServer`` bound to
127.0.0.1 on a free port (no request mocking).  Nothing here contacts any other address: the
AWS credentials are fixed test values, shared config/credential files are pointed at nothing
and the EC2 instance-metadata lookup is disabled.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid

import pytest

TEST_REGION = "us-east-1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _isolated_aws_env(mp: pytest.MonkeyPatch, tmp_dir: str) -> None:
    """Test credentials only; no profiles, no instance metadata, no real AWS."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_REGION", TEST_REGION)
    mp.setenv("AWS_DEFAULT_REGION", TEST_REGION)
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    mp.setenv("AWS_CONFIG_FILE", os.path.join(tmp_dir, "aws-config-none"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.path.join(tmp_dir, "aws-credentials-none"))


@pytest.fixture(autouse=True)
def mlflow_store_restored():
    """mlflow.set_tracking_uri (a test's own, or an in-process stage's) also sets MLFLOW_TRACKING_URI in os.environ,
    which every job a later test starts would inherit, logging into another test's store: put back after each test."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    import mlflow

    mlflow.set_tracking_uri(saved)  # None: unset, as before the test
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Start a real moto S3 server on 127.0.0.1:<free port>; yield its endpoint URL.

    The process environment points the AWS SDKs at it (``AWS_ENDPOINT_URL_S3`` and
    ``AWS_ENDPOINT_URL``), so child processes started during the session (Ray workers)
    reach the same server.
    """
    from moto.server import ThreadedMotoServer

    mp = pytest.MonkeyPatch()
    _isolated_aws_env(mp, str(tmp_path_factory.mktemp("aws")))
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    try:
        yield endpoint
    finally:
        server.stop()
        mp.undo()


def boto3_s3(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=TEST_REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server; ``transfgu_dist.io.storage`` is configured to use
    the server.  Yields ``s3://<bucket>``."""
    from transfgu_dist.io import s3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3_s3(s3_server).create_bucket(Bucket=name)
    s3.configure(s3.S3Options(endpoint_url=s3_server, region=TEST_REGION))
    try:
        yield f"s3://{name}"
    finally:
        s3.configure(None)


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    """A fresh, empty root directory in each supported URI style."""
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return "file://" + str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


# ---- end-to-end runs of the jobs, shared by the pipeline, sweep and object-storage tests ----

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "encoder.arch=vit_tiny_test",
    "encoder.weights=random",
    "data.synthetic_train=12",
    "data.synthetic_val=6",
    "data.synthetic_size=64",
    "crops.image_size=[64, 64]",
    "crops.crop_size=32",
    "crops.images_per_task=3",
    "crops.images_per_part=6",
    "pseudo.images_per_part=6",
    "pseudo.image_size=[64, 64]",
    "train.image_size=[64, 64]",
    "eval.image_size=[64, 64]",
    "train.round_epochs=[1, 1]",
    "train.batch_size=6",
    "pseudo.batch_size=4",
]
# the shared run (e2e_run): SMALL with the linear probe; a rerun of its output names the same settings
E2E = [*SMALL, "probe.enabled=true", "probe.epochs=3", "probe.lr=0.01"]


@pytest.fixture(scope="session")
def shared_ray(s3_server) -> str:
    """One local Ray for the session (its own temp dir, free ports) for the tests that do not kill Ray: in-process
    tests run on it, jobs join it with RAY_ADDRESS=<the yielded GCS address>. Its workers see this process's
    environment as it is at the start, so the S3 test server's is set first. Shut down by its handle at the end,
    never with `ray stop` (every Ray on the machine)."""
    import ray

    from transfgu_dist.pipeline.ray_setup import keep_idle_workers

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    keep_idle_workers()  # as a job's own local Ray
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def jobs_join_shared_ray(shared_ray):
    """The jobs (subprocesses) a module's tests start join the session's Ray (RAY_ADDRESS) instead of starting
    their own: for jobs that neither kill Ray nor need variables set in their Ray workers' environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", shared_ray)
        yield shared_ray


def job(stage: str, *args: str, env: dict[str, str | None] | None = None, timeout: int = 900) -> str:
    """Run `python jobs/<stage>.py args...` as a user would (`env`: variables set, or removed where None); fail
    with its output when it fails."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", f"{stage}.py"), *args],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None},
    )  # one stream: the console as a user sees it, in order
    assert proc.returncode == 0, f"{stage} failed:\n{proc.stdout[-9000:]}"
    return proc.stdout


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory):
    """One complete `jobs/run_all.py` run on small synthetic data (a real local Ray), with the linear probe; returns
    its output, where its console output (stdout + stderr) is kept as `console.log`."""
    from pathlib import Path

    out = tmp_path_factory.mktemp("e2e")
    log = job("run_all", f"output={out}", *E2E)
    (Path(out) / "console.log").write_text(log)
    assert "mIoU" in log and "stage wall times" in log
    return Path(out)
