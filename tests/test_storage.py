"""transfgu_dist.io.storage on local disk, file:// URIs and a real (moto) S3 server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pyarrow.fs as pafs
import pytest

from transfgu_dist.io import s3, storage
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.io.storage_errors import StorageError

TEST_REGION = "us-east-1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- basics


def test_round_trip(root):
    a = storage.join(root, "a.bin")
    nested = storage.join(root, "sub", "deeper", "b.npy")
    assert not storage.exists(a)
    storage.write_bytes(a, b"hello")
    storage.write_bytes(nested, b"\x00" * 1000)
    storage.write_json(storage.join(root, "meta.json"), {"k": [1, 2], "s": "x"})

    assert storage.exists(a) and storage.exists(nested)
    assert storage.exists(storage.join(root, "sub"))  # prefix / directory
    assert storage.read_bytes(a) == b"hello"
    assert storage.read_bytes(nested) == b"\x00" * 1000
    assert storage.read_json(storage.join(root, "meta.json")) == {"k": [1, 2], "s": "x"}

    storage.write_bytes(a, b"overwritten")  # overwrite is allowed and whole
    assert storage.read_bytes(a) == b"overwritten"

    assert storage.list_files(root) == sorted([a, nested, storage.join(root, "meta.json")])
    assert storage.list_files(root, suffixes=(".npy", ".json")) == [storage.join(root, "meta.json"), nested]
    assert storage.list_files(storage.join(root, "missing-dir")) == []

    storage.delete(a)
    assert not storage.exists(a)
    storage.delete(a)  # deleting what is gone is a no-op
    storage.delete(storage.join(root, "sub"))  # a whole prefix
    assert not storage.exists(nested)
    assert storage.list_files(root) == [storage.join(root, "meta.json")]


def test_local_write_leaves_no_temporaries(tmp_path):
    target = str(tmp_path / "d" / "x.bin")
    for i in range(3):
        storage.write_bytes(target, bytes([i]) * 10)
    assert os.listdir(tmp_path / "d") == ["x.bin"]
    assert storage.read_bytes(target) == b"\x02" * 10


def test_local_stage_staging_cleanup_and_json_types(tmp_path):
    import numpy as np

    out = StageOutput(str(tmp_path / "stage"))
    out.write_part("a.npy", b"1")
    out.write_part("a.npy", b"2")  # a retried write of the same part
    assert os.listdir(tmp_path / "stage" / "_tmp") == []  # no staging leftovers
    assert storage.read_bytes(out.part_uri("a.npy")) == b"2"
    out.commit({"miou": np.float32(0.25), "hist": np.arange(3), "classes": {"b", "a"}})
    assert sorted(os.listdir(tmp_path / "stage")) == ["_SUCCESS.json", "a.npy"]
    m = out.manifest()
    assert m["miou"] == 0.25 and m["hist"] == [0, 1, 2] and m["classes"] == ["a", "b"]


def test_local_copy(root):
    uri = storage.join(root, "ckpt", "model.pt")
    storage.write_bytes(uri, b"weights")
    with storage.local_copy(uri) as path:
        assert os.path.isfile(path) and path.endswith("model.pt")
        with open(path, "rb") as f:
            assert f.read() == b"weights"
    if root.startswith("s3://"):
        assert not os.path.exists(path)  # the download is cleaned up
    with pytest.raises(StorageError, match="does not exist"):
        with storage.local_copy(storage.join(root, "nope.pt")):
            pass


def test_join_and_filesystem(tmp_path):
    assert storage.join("s3://b", "x", "/y/") == "s3://b/x/y"
    assert storage.join("s3://b/p/", "q") == "s3://b/p/q"
    assert storage.join("file:///tmp/a", "b") == "file:///tmp/a/b"
    assert storage.join("/tmp/a", "b", "c") == "/tmp/a/b/c"
    fs, path = storage.filesystem("file://" + str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)
    with pytest.raises(StorageError, match="unsupported scheme"):
        storage.filesystem("gs://bucket/x")


def test_s3_filesystem_cached_and_path(s3_bucket):
    fs1, p1 = storage.filesystem(s3_bucket + "/a/b")
    fs2, p2 = storage.filesystem(s3_bucket + "/c")
    assert isinstance(fs1, pafs.S3FileSystem) and fs1 is fs2
    assert p1 == s3_bucket[len("s3://") :] + "/a/b"


def test_s3_options_defaults_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    opts = s3.S3Options()
    assert opts.endpoint_url == "http://127.0.0.1:2"  # the S3-specific variable wins
    assert opts.region == "eu-west-3" and opts.anonymous is False


# ------------------------------------------------------------------------------- StageOutput


def test_stage_output_commit_protocol(root):
    out = StageOutput(storage.join(root, "stage"))
    assert not out.is_committed()
    assert out.done_parts() == set()

    assert out.write_part("part-00000.npy", b"a") == out.part_uri("part-00000.npy")
    out.write_part("shards/part-00001.npy", b"b")
    # a crashed attempt left a staged, never-published part behind
    storage.write_bytes(storage.join(out.uri, "_tmp", "dead-attempt", "part-00002.npy"), b"c")

    assert out.done_parts() == {"part-00000.npy", "shards/part-00001.npy"}
    assert not out.is_committed()
    with pytest.raises(StorageError, match="not committed"):
        out.manifest()

    # resuming in another process: a new object sees the same published parts
    resumed = StageOutput(out.uri)
    assert resumed.done_parts() == out.done_parts()
    resumed.write_part("part-00002.npy", b"c")

    doc = resumed.commit({"num_images": 3, "model": "dino_vits8"})
    assert out.is_committed()
    m = out.manifest()
    assert m == doc
    assert m["parts"] == ["part-00000.npy", "part-00002.npy", "shards/part-00001.npy"]
    assert m["num_images"] == 3 and m["model"] == "dino_vits8" and "committed_at" in m
    assert storage.read_bytes(out.part_uri("part-00002.npy")) == b"c"
    # _tmp is gone, the marker is not a part
    names = [u[len(out.uri) + 1 :] for u in storage.list_files(out.uri)]
    assert names == ["_SUCCESS.json", "part-00000.npy", "part-00002.npy", "shards/part-00001.npy"]
    assert out.done_parts() == set(m["parts"])


def test_stage_output_rejects_reserved_names(tmp_path):
    out = StageOutput(str(tmp_path / "s"))
    for bad in ("_SUCCESS.json", "_tmp/x", "../escape", "", "a/../b"):
        with pytest.raises(ValueError):
            out.write_part(bad, b"x")
    with pytest.raises(ValueError, match="reserved"):
        out.commit({"parts": []})


# ------------------------------------------------------------------------------- errors


def test_missing_bucket(s3_bucket):
    uri = "s3://no-such-bucket-transfgu/x/part.npy"
    for call in (
        storage.read_bytes,
        storage.exists,
        storage.list_files,
        lambda u: storage.write_bytes(u, b"x"),
        lambda u: StageOutput(u).done_parts(),
    ):
        with pytest.raises(StorageError) as ei:
            call(uri)
        msg = str(ei.value)
        assert msg.startswith(uri + ":"), msg
        assert "bucket 'no-such-bucket-transfgu' does not exist" in msg, msg
        assert "127.0.0.1" in msg, msg  # names the endpoint


def test_missing_key(s3_bucket):
    uri = s3_bucket + "/does/not/exist.npy"
    with pytest.raises(StorageError) as ei:
        storage.read_bytes(uri)
    msg = str(ei.value)
    assert msg.startswith(uri + ":") and "does not exist" in msg and "bucket" not in msg, msg
    assert storage.exists(uri) is False  # exists() answers for a missing key in a real bucket


def test_missing_local_file(tmp_path):
    uri = str(tmp_path / "nope.bin")
    with pytest.raises(StorageError, match="nope.bin: does not exist"):
        storage.read_bytes(uri)


def test_uncommitted_manifest_and_bad_json(tmp_path):
    storage.write_bytes(str(tmp_path / "x.json"), b"{not json")
    with pytest.raises(StorageError, match="expected a JSON document"):
        storage.read_json(str(tmp_path / "x.json"))


def test_unreachable_endpoint(s3_server):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    s3.configure(s3.S3Options(endpoint_url=dead, region=TEST_REGION))
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageError) as ei:
            storage.read_bytes("s3://bucket/key")
        msg = str(ei.value)
        assert msg.startswith("s3://bucket/key:") and "cannot reach" in msg and dead in msg, msg
        assert time.monotonic() - t0 < 60
    finally:
        s3.configure(None)


@pytest.fixture(scope="module")
def auth_s3_server(s3_server, tmp_path_factory):
    """A second real moto server that enforces credentials (INITIAL_NO_AUTH_ACTION_COUNT=0).

    The default moto server accepts any credentials, so "bad credentials" can only be shown
    with authentication switched on; it runs in a subprocess because moto reads that setting
    at import time.
    """
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    log = open(tmp_path_factory.mktemp("moto-auth") / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto auth server did not start (see {log.name})")
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_wrong_credentials(auth_s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    s3.configure(s3.S3Options(endpoint_url=auth_s3_server, region=TEST_REGION))
    try:
        for call in (storage.read_bytes, lambda u: storage.write_bytes(u, b"x")):
            uri = "s3://some-bucket/some/key.bin"
            with pytest.raises(StorageError) as ei:
                call(uri)
            msg = str(ei.value)
            assert msg.startswith(uri + ":") and "access denied" in msg, msg
            assert "credentials" in msg and auth_s3_server in msg, msg
    finally:
        s3.configure(None)


# ------------------------------------------------------------------------------- Ray glue


def test_ray_storage(s3_bucket, tmp_path):
    path, fs = storage.ray_storage(s3_bucket + "/ray_results")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == s3_bucket[len("s3://") :] + "/ray_results"
    with fs.open_output_stream(path + "/probe.txt") as f:  # the filesystem Ray would use works
        f.write(b"ok")
    assert storage.read_bytes(s3_bucket + "/ray_results/probe.txt") == b"ok"

    local, none = storage.ray_storage(str(tmp_path / "rr"))
    assert local == str(tmp_path / "rr") and none is None
    assert storage.ray_storage("file://" + str(tmp_path)) == (str(tmp_path), None)


_RAY_TRAIN_SCRIPT = r"""
import json, os, sys, tempfile
import ray
from ray import train
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from transfgu_dist.io import storage

def loop(cfg):
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "state.txt"), "w") as f:
            f.write("epoch-0")
        train.report({"loss": 0.5}, checkpoint=Checkpoint.from_directory(d))

ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
path, fs = storage.ray_storage(sys.argv[1])
result = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                      run_config=RunConfig(name="probe", storage_path=path,
                                           storage_filesystem=fs)).fit()
print(json.dumps({"checkpoint": result.checkpoint.path}))
ray.shutdown()
"""


@pytest.mark.slow
def test_ray_train_checkpoint_to_s3(s3_bucket, s3_server, tmp_path):
    """A Ray Train run given ray_storage(s3://...) writes its checkpoint to the moto server.

    Runs in a fresh interpreter (its own local Ray instance) that inherits the test AWS
    environment, so Ray workers talk to 127.0.0.1 only."""
    env = dict(os.environ, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="180")
    env.pop("RAY_ADDRESS", None)
    for attempt in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _RAY_TRAIN_SCRIPT, s3_bucket + "/ray_results"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=str(tmp_path),
        )
        # Ray gives a starting raylet a fixed 30 s; on a loaded 2-core machine that can pass.
        if proc.returncode == 0 or "timed out during startup" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = json.loads(proc.stdout.strip().splitlines()[-1])["checkpoint"]
    assert ckpt.startswith(s3_bucket[len("s3://") :] + "/ray_results/probe/checkpoint_")
    assert storage.read_bytes(f"s3://{ckpt}/state.txt") == b"epoch-0"


# ------------------------------------------------------------------------------- other clients


def test_error_for_boto3_errors(s3_bucket):
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    uri = "s3://nobucket/data"
    missing = ClientError(
        {"Error": {"Code": "NoSuchBucket", "Message": "The specified bucket does not exist"}}, "ListObjectsV2"
    )
    assert str(storage.error_for(uri, missing, "list it")).startswith(f"{uri}: bucket 'nobucket' does not exist")
    denied = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "no such key id"}}, "PutObject")
    msg = str(storage.error_for(uri, denied, "upload x"))
    assert "access denied while trying to upload x" in msg and "credentials" in msg, msg
    down = EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert "cannot reach the S3 endpoint" in str(storage.error_for(uri, down, "list it"))
    msg = str(storage.error_for(uri, NoCredentialsError(), "list it"))
    assert msg.startswith(f"{uri}: no usable AWS credentials") and "AWS_ACCESS_KEY_ID" in msg


def test_boto3_client_reaches_the_configured_endpoint(s3_bucket):
    bucket, key = storage.split_s3(s3_bucket + "/a/b.txt")
    assert key == "a/b.txt"
    s3.boto3_client().put_object(Bucket=bucket, Key=key, Body=b"via boto3")
    assert storage.read_bytes(s3_bucket + "/a/b.txt") == b"via boto3"
    with pytest.raises(StorageError, match="expected an s3://"):
        storage.split_s3("/local/path")
