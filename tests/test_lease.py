"""One driver per output (transfgu_dist.lease): real processes racing for one output folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from transfgu_dist.lease import LEASE, Lease, LeaseError, hold

HOLD = ("import sys, time; from transfgu_dist.lease import hold, LeaseError\n"
        "try:\n    hold(sys.argv[1]); print('held', flush=True)\nexcept LeaseError as e:\n    print('refused', e, flush=True)"
        "\n    sys.exit(3)\ntime.sleep(float(sys.argv[2]))")


def driver(out, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(seconds)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})


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
