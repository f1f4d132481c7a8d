"""One driver per output: a lease file `<output>/_LEASE.json` holding the driver's host, pid, heartbeat time and a
fencing token (a fresh id per holder).

Locally every read-check-write of the record runs under an exclusive `fcntl.flock` of `<output>/_LEASE.lock` and
replaces the record by rename, so of any number of drivers taking a free or stale lease at once exactly one gets
it; on S3 with conditional puts (`If-None-Match: *`, then `If-Match` on the ETag seen, S3Lease). The other drivers
are refused in one line naming the holder. A lease whose holder is gone (same host, pid not alive) or whose
heartbeat is older than `ttl` seconds is stale and taken over. The holder refreshes the heartbeat every `ttl / 4`
seconds from a daemon thread and removes the lease on exit. A holder that stalled past `ttl` and lost the lease
finds out at its next heartbeat (`lost`: the heartbeat stops, a warning is logged) and, through the fencing check
StageOutput.commit runs (`check`), commits nothing more: it stops with one line.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from transfgu_dist.config import ConfigError
from transfgu_dist.io import s3, stage_output, storage
from transfgu_dist.io.storage_errors import StorageError

LEASE, LOCK = "_LEASE.json", "_LEASE.lock"
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
    """Start `lease`'s heartbeat thread, its fencing check before every commit and its release at exit; returns
    it."""
    threading.Thread(target=lease._heartbeat, daemon=True).start()
    stage_output.set_fence(lease.check)
    atexit.register(lease.release)
    _held.append(lease)
    return lease


_held: list = []  # this process's leases (_started)


def release_held() -> None:
    """Release this process's leases now, for an exit that skips atexit (os._exit)."""
    for lease in _held:
        with contextlib.suppress(Exception):
            lease.release()


def _identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}


def _lost(where: str, holder: dict | None) -> LeaseError:
    now = f"host {holder.get('host')}, pid {holder.get('pid')}" if holder else "nobody"
    return LeaseError(
        f"{where}: this driver lost the output (it stalled past the lease's ttl; held now by {now}); stopped "
        "before committing anything more"
    )


class Lease:
    def __init__(self, output: str, ttl: float = 600.0):
        self.path, self.lock, self.ttl = Path(output) / LEASE, Path(output) / LOCK, ttl
        self.me = _identity()
        self.lost = False
        self._stop = threading.Event()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the exclusive flock of the lock file (re-taken when the file was replaced while this driver
        waited: a releasing holder removes it)."""
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == os.stat(self.lock).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield
        finally:
            os.close(fd)  # releases the flock

    def _holder(self) -> dict | None:
        """The lease record (under the lock); None when there is none. A damaged one is stale from its mtime."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"time": self.path.stat().st_mtime}

    def _write(self) -> None:
        """This driver's record, written beside the lease and renamed over it (under the lock)."""
        tmp = self.path.with_name(f".{LEASE}.{self.me['token']}")
        tmp.write_bytes(_record(self.me))
        os.replace(tmp, self.path)

    def _ours(self, holder: dict | None) -> bool:
        return holder is not None and holder.get("token") == self.me["token"]

    def acquire(self) -> Lease:
        """Take the lease (or a stale one); LeaseError in one line when a live driver holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            holder = self._holder()
            if holder is not None and not _stale(holder, self.ttl):
                raise _refusal(str(self.path), holder)
            self._write()
        return _started(self)

    def check(self, uri: str = "") -> None:
        """The fencing check before a commit (of `uri`): LeaseError in one line when the lease is not ours now."""
        with self._locked():
            holder = self._holder()
        if not self._ours(holder):
            self.lost = True
            raise _lost(uri or str(self.path), holder)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            with self._locked():
                holder = self._holder()
                if not self._ours(holder):
                    self.lost = True
                    log.warning(
                        "%s: the lease was taken over by another driver (this one stalled past %.0f s); "
                        "this driver commits nothing more",
                        self.path,
                        self.ttl,
                    )
                    return
                self._write()

    def release(self) -> None:
        """Remove the lease and its lock file if the lease is still this driver's."""
        self._stop.set()
        stage_output.set_fence(None, self.check)
        with contextlib.suppress(OSError), self._locked():
            if self._ours(self._holder()):
                self.path.unlink()
                self.lock.unlink()


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
        self.me = _identity()
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

    def check(self, uri: str = "") -> None:
        """The fencing check before a commit (of `uri`): LeaseError in one line when the lease is not ours now."""
        current = self._holder()
        holder = current[0] if current else None
        if holder is None or holder.get("token") != self.me["token"]:
            self.lost = True
            raise _lost(uri or self.uri, holder)

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
        stage_output.set_fence(None, self.check)
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
