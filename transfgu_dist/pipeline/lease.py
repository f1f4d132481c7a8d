"""One driver per output: a lease file `<output>/_LEASE.json` holding the driver's host, pid and heartbeat time.

Locally it is created with O_CREAT | O_EXCL (atomic on a local or shared POSIX file system); on S3 with a
conditional put (`If-None-Match: *`, S3Lease). Of two drivers started together exactly one gets it; the other is
refused in one line naming the holder. A lease whose holder is gone (same host, pid not alive) or whose heartbeat
is older than `ttl` seconds is stale and taken over. The holder refreshes the heartbeat every `ttl / 4` seconds
from a daemon thread and removes the lease on exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from transfgu_dist.config import ConfigError
from transfgu_dist.io import s3, storage
from transfgu_dist.io.storage_errors import StorageError

LEASE = "_LEASE.json"
log = logging.getLogger(__name__)


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


def _refusal(where: str, holder: dict) -> LeaseError:
    return LeaseError(
        f"{where}: output held by another driver (host {holder.get('host')}, pid {holder.get('pid')}, "
        f"heartbeat {time.time() - holder.get('time', 0):.0f} s ago); wait for it or use another output="
    )


def _record(me: dict) -> bytes:
    return json.dumps({**me, "time": time.time()}).encode()


def _started(lease):
    """Start `lease`'s heartbeat thread and its release at exit; returns it."""
    threading.Thread(target=lease._heartbeat, daemon=True).start()
    atexit.register(lease.release)
    return lease


class Lease:
    def __init__(self, output: str, ttl: float = 600.0):
        self.path, self.ttl = Path(output) / LEASE, ttl
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()

    def _write(self, path: Path) -> None:
        """Create `path` exclusively with this driver's record (FileExistsError when it exists)."""
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
            f.write(_record(self.me))

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
                    raise _refusal(str(self.path), holder) from None
                self.path.unlink(missing_ok=True)  # stale: take over
        else:
            raise LeaseError(f"{self.path}: another driver took the output while this one took over a stale lease")
        return _started(self)

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


_CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _conflict(e: Exception) -> bool:
    """A conditional put lost: 412 Precondition Failed (or S3's 409 for a concurrent conditional write)."""
    return getattr(e, "response", {}).get("Error", {}).get("Code") in _CONFLICT


class S3Lease:
    """The lease as an S3 object. Created with `If-None-Match: *`, so of two drivers exactly one put succeeds; the
    holder's heartbeat and a takeover of a stale lease are puts with `If-Match` on the ETag last seen, so of two
    drivers taking over one stale lease only one wins, and a holder whose lease was taken over (it stalled past
    `ttl`) finds out at its next heartbeat, stops it and logs a warning (`lost`)."""

    def __init__(self, output: str, ttl: float = 600.0, client=None):
        self.uri, self.ttl = storage.join(output, LEASE), ttl
        self.bucket, self.key = storage.split_s3(self.uri)
        self.client = client or s3.boto3_client()
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()

    def _put(self, **condition: str) -> str:
        return self.client.put_object(
            Bucket=self.bucket, Key=self.key, Body=_record(self.me), ContentType="application/json", **condition
        )["ETag"]

    def _holder(self) -> tuple[dict, str] | None:
        """The current lease record and its ETag; None when there is none (released meanwhile)."""
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        body = got["Body"].read()
        try:
            holder = json.loads(body)
        except ValueError:  # not a lease record: stale from its upload time on
            holder = {"time": got["LastModified"].timestamp()}
        return holder, got["ETag"]

    def take_over(self, etag: str) -> None:
        """Replace the stale lease whose ETag is `etag`; LeaseError when another driver replaced it first."""
        try:
            self.etag = self._put(IfMatch=etag)
        except Exception as e:
            if _conflict(e):
                raise LeaseError(
                    f"{self.uri}: another driver took the output while this one took over a stale lease"
                ) from None
            raise

    def acquire(self) -> S3Lease:
        """Take the lease (or a stale one); LeaseError in one line when a live driver holds it."""
        for _ in range(2):
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except Exception as e:
                if not _conflict(e):
                    raise StorageError(self.uri, f"could not create the lease ({e})") from e
            current = self._holder()
            if current is None:
                continue  # released between the put and the read: try again
            holder, etag = current
            if not _stale(holder, self.ttl):
                raise _refusal(self.uri, holder)
            self.take_over(etag)
            break
        else:
            raise LeaseError(f"{self.uri}: the lease changed hands twice while this driver tried to take it")
        return _started(self)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as e:  # noqa: BLE001 - a heartbeat must never kill the driver
                if _conflict(e):
                    self.lost = True
                    log.warning(
                        "%s: the lease was taken over by another driver (this one stalled past %.0f s); "
                        "its outputs are no longer guarded",
                        self.uri,
                        self.ttl,
                    )
                    return
                log.warning("%s: lease heartbeat failed (%s); retrying", self.uri, e)

    def release(self) -> None:
        """Delete the lease if it is still this driver's (a conditional delete on its ETag)."""
        self._stop.set()
        if self.etag and not self.lost:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            except Exception:  # noqa: BLE001 - taken over meanwhile, or the store is gone: nothing of ours to remove
                pass
            self.etag = None


def hold(output: str) -> Lease | S3Lease:
    """Hold `output` for this driver (a local path, file:// or s3://)."""
    if storage.is_s3(output):
        return S3Lease(output).acquire()
    return Lease(output.removeprefix("file://")).acquire()
