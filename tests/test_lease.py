"""One driver per output (transfgu_dist.pipeline.lease): real processes racing for one output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from transfgu_dist.pipeline.lease import LEASE, Lease, LeaseError, hold

HOLD = (
    "import sys, time; from transfgu_dist.pipeline.lease import hold, LeaseError\n"
    "try:\n    hold(sys.argv[1]); print('held', flush=True)\n"
    "except LeaseError as e:\n    print('refused', e, flush=True)"
    "\n    sys.exit(3)\ntime.sleep(float(sys.argv[2]))"
)


def driver(out, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def test_two_drivers_started_together_exactly_one_holds(tmp_path):
    procs = [driver(tmp_path / "out", 3) for _ in range(2)]
    lines = [p.stdout.readline().strip() for p in procs]
    assert sorted(line.split()[0] for line in lines) == ["held", "refused"]
    refused = next(line for line in lines if line.startswith("refused"))
    assert f"{tmp_path / 'out' / LEASE}: output held by another driver" in refused and "\n" not in refused
    assert sorted(p.wait(30) for p in procs) == [0, 3]
    assert not (tmp_path / "out" / LEASE).exists()  # released at exit


def test_lease_of_a_killed_driver_is_taken_over(tmp_path):
    proc = driver(tmp_path, 60)
    assert proc.stdout.readline().startswith("held")
    with pytest.raises(LeaseError, match=f"pid {proc.pid}"):
        Lease(str(tmp_path)).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert (tmp_path / LEASE).exists()  # left behind by the killed holder
    lease = hold(str(tmp_path))
    assert json.loads((tmp_path / LEASE).read_text())["pid"] == os.getpid()
    lease.release()
    assert not (tmp_path / LEASE).exists()


def test_expired_heartbeat_of_another_host_is_taken_over(tmp_path):
    (tmp_path / LEASE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": time.time() - 30}))
    with pytest.raises(LeaseError, match="host elsewhere, pid 1"):
        Lease(str(tmp_path), ttl=60).acquire()
    lease = Lease(str(tmp_path), ttl=20).acquire()  # 30 s without a heartbeat is past a 20 s ttl
    assert json.loads((tmp_path / LEASE).read_text())["host"] != "elsewhere"
    lease.release()


def test_heartbeat_refreshes_the_lease(tmp_path):
    lease = Lease(str(tmp_path), ttl=0.4).acquire()
    first = json.loads((tmp_path / LEASE).read_text())["time"]
    time.sleep(0.35)
    assert json.loads((tmp_path / LEASE).read_text())["time"] > first
    lease.release()


# ---- on S3 (the real moto server of tests/conftest.py): conditional puts


@pytest.fixture
def s3_lease(s3_bucket):
    """(output URI, boto3 client, bucket, lease key) on a fresh bucket; one client for the whole test."""
    from transfgu_dist.io import s3

    return f"{s3_bucket}/run", s3.boto3_client(), s3_bucket.removeprefix("s3://"), f"run/{LEASE}"


def record(s3_lease) -> tuple[dict, str]:
    _, client, bucket, key = s3_lease
    got = client.get_object(Bucket=bucket, Key=key)
    return json.loads(got["Body"].read()), got["ETag"]


def test_s3_lease_conditional_put_refuses_the_second_driver(s3_lease):
    from transfgu_dist.pipeline.lease import S3Lease

    out, client, bucket, _ = s3_lease
    first = hold(out)
    assert isinstance(first, S3Lease) and record(s3_lease)[0]["pid"] == os.getpid()
    with pytest.raises(LeaseError, match=f"{out}/{LEASE}: output held by another driver .*pid {os.getpid()}"):
        S3Lease(out, client=client).acquire()  # If-None-Match: * refused the put; the holder (same host) is live
    first.release()
    second = S3Lease(out, client=client).acquire()  # released: the conditional put succeeds again
    second.release()
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)


def test_s3_stale_lease_taken_over_once_and_a_stalled_holder_finds_out(s3_lease):
    """An expired heartbeat from another host is taken over with If-Match on its ETag; a second driver taking over
    the same stale ETag loses (412); the holder whose lease was taken stops its heartbeat (`lost`)."""
    from transfgu_dist.pipeline.lease import S3Lease

    out, client, bucket, key = s3_lease
    put = lambda host, pid, age: client.put_object(  # noqa: E731
        Bucket=bucket, Key=key, Body=json.dumps({"host": host, "pid": pid, "time": time.time() - age}).encode()
    )
    stale = put("elsewhere", 1, 30)["ETag"]
    with pytest.raises(LeaseError, match="host elsewhere, pid 1"):
        S3Lease(out, ttl=60, client=client).acquire()
    winner = S3Lease(out, ttl=0.4, client=client).acquire()  # 30 s without a heartbeat is past its 0.4 s ttl
    assert record(s3_lease)[0]["host"] != "elsewhere"
    with pytest.raises(LeaseError, match="another driver took the output"):
        S3Lease(out, client=client).take_over(stale)  # raced the winner on the same stale lease
    time.sleep(0.25)
    beat, etag = record(s3_lease)
    assert beat["pid"] == os.getpid() and beat["time"] > time.time() - 0.2 and etag == winner.etag  # refreshed
    put("other", 2, 0)  # taken over behind the holder's back
    time.sleep(0.3)
    assert winner.lost and record(s3_lease)[0]["host"] == "other"  # the stalled holder did not write it back
    winner.release()  # not ours any more: left in place
    assert record(s3_lease)[0]["host"] == "other"


# ---- the local take-over race and a stalled holder (fork: the takers start together, no interpreter start-up)


def _take(out: str, ttl: float, start, done, results) -> None:
    """A driver process: wait for the others, try to take the lease, hold it until every taker has tried."""
    start.wait(30)
    try:
        lease = Lease(out, ttl=ttl).acquire()
        results.put(("held", lease.me["token"]))
    except LeaseError:
        results.put(("refused", ""))
    done.wait(30)


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_many_concurrent_takers_exactly_one_holds(tmp_path, stale):
    """12 processes take one free (or stale: a dead host's expired heartbeat) lease at the same instant, 10 (30)
    times: every time exactly one holds it, and the lease file names that one. (Taking over a stale lease by delete
    and create-exclusive gave 2 or 3 holders in 15 of 60 such trials.)"""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    takers, trials, winners = 12, 30 if stale else 10, []
    for trial in range(trials):
        out = tmp_path / str(trial)
        out.mkdir()
        if stale:
            (out / LEASE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": time.time() - 100}))
        start, done, results = ctx.Barrier(takers), ctx.Barrier(takers + 1), ctx.Queue()
        procs = [ctx.Process(target=_take, args=(str(out), 60.0, start, done, results)) for _ in range(takers)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        held = [token for what, token in got if what == "held"]
        assert json.loads((out / LEASE).read_text())["token"] in held
        done.wait(30)
        for p in procs:
            p.join(30)
        winners.append(len(held))
    print(f"\nholders per trial ({takers} takers, {'stale' if stale else 'free'} lease): {winners}")
    assert winners == [1] * trials


def test_a_stalled_holder_finds_out_and_commits_nothing(tmp_path):
    """The holder's lease is taken over behind its back (it stalled past the ttl): its heartbeat stops without
    writing the lease back (`lost`), and its next commit fails in one line before writing the commit marker."""
    from transfgu_dist.io.stage_output import StageOutput

    holder = Lease(str(tmp_path), ttl=0.4).acquire()
    out = StageOutput(str(tmp_path / "features"))
    out.commit({})  # ours: committed
    (tmp_path / LEASE).write_text(json.dumps({"host": "other", "pid": 2, "time": time.time(), "token": "theirs"}))
    time.sleep(0.3)
    assert holder.lost and json.loads((tmp_path / LEASE).read_text())["token"] == "theirs"
    again = StageOutput(str(tmp_path / "bank"))
    with pytest.raises(LeaseError, match=f"{again.uri}: this driver lost the output .*held now by host other, pid 2"):
        again.commit({})
    assert not (tmp_path / "bank" / "_SUCCESS.json").exists()
    holder.release()  # not ours: left in place
    assert json.loads((tmp_path / LEASE).read_text())["token"] == "theirs"
