"""One driver per output: a lease file `<output>/_LEASE.json` holding the driver's host, pid and heartbeat time.

Created with O_CREAT | O_EXCL (atomic on a local or shared POSIX file system), so of two drivers started together
exactly one gets it; the other is refused in one line naming the holder. A lease whose holder is gone (same host,
pid not alive) or whose heartbeat is older than `ttl` seconds is stale and taken over. The holder refreshes the
heartbeat every `ttl / 4` seconds from a daemon thread and removes the file on exit.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from pathlib import Path

from transfgu_dist.config import ConfigError

LEASE = "_LEASE.json"


class LeaseError(ConfigError):
    """The output folder is held by another live driver."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(holder: dict, ttl: float) -> bool:
    if time.time() - holder.get("time", 0) > ttl:
        return True
    return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))


class Lease:
    def __init__(self, output: str, ttl: float = 600.0):
        self.path, self.ttl = Path(output) / LEASE, ttl
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()

    def _write(self, path: Path) -> None:
        """Create `path` exclusively with this driver's record (FileExistsError when it exists)."""
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as f:
            json.dump({**self.me, "time": time.time()}, f)

    def acquire(self) -> Lease:
        """Take the lease (or a stale one); LeaseError in one line when a live driver holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                self._write(self.path)
                break
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):  # being written now, or by a driver killed mid-write
                    holder = {"time": self.path.stat().st_mtime if self.path.exists() else 0}
                if not _stale(holder, self.ttl):
                    raise LeaseError(f"{self.path}: output held by another driver (host {holder.get('host')}, pid "
                                     f"{holder.get('pid')}, heartbeat {time.time() - holder['time']:.0f} s ago); "
                                     f"wait for it or use another output=") from None
                self.path.unlink(missing_ok=True)  # stale: take over
        else:
            raise LeaseError(f"{self.path}: another driver took the output while this one took over a stale lease")
        threading.Thread(target=self._heartbeat, daemon=True).start()
        atexit.register(self.release)
        return self

    def _heartbeat(self) -> None:
        tmp = self.path.with_name(f".{LEASE}.{self.me['pid']}")
        while not self._stop.wait(self.ttl / 4):
            tmp.unlink(missing_ok=True)
            self._write(tmp)
            os.replace(tmp, self.path)  # atomic: a reader never sees a half-written heartbeat

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == self.me["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def hold(output: str) -> Lease | None:
    """Hold `output` for this driver. Local paths only: object stores (s3://) are not leased yet."""
    if "://" in output and not output.startswith("file://"):
        return None
    return Lease(output.removeprefix("file://")).acquire()
