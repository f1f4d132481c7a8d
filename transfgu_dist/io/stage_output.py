"""The commit protocol of a stage's output directory: parts are published whole, `_SUCCESS.json` is written last.

On local disk a part is written under a fresh ``<dir>/_tmp/<uuid>/`` and renamed to its final name; on S3 it is one
PUT of the final name (an object appears only when complete). Readers trust a stage only once ``_SUCCESS.json``
exists.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import uuid
from collections.abc import Callable

from transfgu_dist.io import storage
from transfgu_dist.io.storage_errors import StorageError

SUCCESS_NAME = "_SUCCESS.json"
TMP_DIR_NAME = "_tmp"
_fence: Callable[[str], None] | None = None  # StageOutput.commit's check that this driver still holds its output


def set_fence(check: Callable[[str], None] | None, replaced: Callable[[str], None] | None = None) -> None:
    """Set the fencing check every :meth:`StageOutput.commit` runs first (the driver's lease: one that lost its
    output to another driver raises there); `replaced`: only if that one is set now (None clears it)."""
    global _fence
    if replaced is None or _fence == replaced:
        _fence = check


class StageOutput:
    """A stage's output directory with an all-or-nothing commit.

    - :meth:`write_part` stages ``name`` under a fresh ``<dir>/_tmp/<uuid>/`` and then moves it to
      ``<dir>/<name>``, so a part is either fully present or absent;
    - :meth:`done_parts` lists committed parts (for resuming an interrupted stage);
    - :meth:`commit` writes ``<dir>/_SUCCESS.json`` last (manifest = caller metadata plus
      ``parts`` and ``committed_at``) and removes ``_tmp``.

    Part names are deterministic per input shard, so a retried attempt rewrites the same
    names with the same content; readers trust the directory only once it is committed.
    """

    RESERVED_KEYS = ("parts", "committed_at")

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") if uri.rstrip("/") else uri

    def __repr__(self) -> str:
        return f"StageOutput({self.uri!r})"

    @property
    def success_uri(self) -> str:
        return storage.join(self.uri, SUCCESS_NAME)

    def part_uri(self, name: str) -> str:
        self._check_name(name)
        return storage.join(self.uri, name)

    @staticmethod
    def _check_name(name: str) -> None:
        parts = name.strip("/").split("/")
        if not name.strip("/") or any(p in ("", ".", "..") for p in parts) or parts[0] in (SUCCESS_NAME, TMP_DIR_NAME):
            raise ValueError(f"invalid part name {name!r}")

    def write_part(self, name: str, data: bytes) -> str:
        """Publish one part; returns its final URI. On S3 one PUT of the final name (an object appears only when
        complete); on local disk a staged file renamed into place."""
        final = self.part_uri(name)
        if storage.is_s3(final):
            storage.write_bytes(final, data)
            return final
        # A fresh staging directory per write: concurrent or retried writers of the same part
        # never share a temporary file.
        staging = storage.join(self.uri, TMP_DIR_NAME, uuid.uuid4().hex)
        tmp = storage.join(staging, name)
        storage.write_bytes(tmp, data)
        storage.move(tmp, final)
        shutil.rmtree(storage.filesystem(staging)[1], ignore_errors=True)
        return final

    def done_parts(self) -> set[str]:
        """Names of the parts already published (``_tmp`` leftovers and the marker excluded)."""
        rel = storage.relative_files(self.uri, "list a stage directory")
        return {r for r in rel if r and r != SUCCESS_NAME and r.split("/", 1)[0] != TMP_DIR_NAME}

    def commit(self, manifest: dict | None = None) -> dict:
        """Write ``_SUCCESS.json`` (caller metadata + ``parts`` + ``committed_at``), drop ``_tmp``."""
        manifest = dict(manifest or {})
        clash = [k for k in self.RESERVED_KEYS if k in manifest]
        if clash:
            raise ValueError(f"manifest keys {clash} are reserved by StageOutput.commit")
        if _fence is not None:
            _fence(self.uri)
        doc = {
            **manifest,
            "parts": sorted(self.done_parts()),
            "committed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        storage.write_json(self.success_uri, doc)
        storage.delete(storage.join(self.uri, TMP_DIR_NAME))
        return doc

    def is_committed(self) -> bool:
        return storage.exists(self.success_uri)

    def manifest(self) -> dict:
        """The committed manifest; :class:`StorageError` if the stage is not committed, or in one line naming the
        file if it is not a commit record (a JSON object with ``parts`` and ``committed_at``)."""
        try:
            doc = storage.read_json(self.success_uri)
        except StorageError as exc:
            if not storage.exists(self.success_uri):
                raise StorageError(self.uri, f"stage output is not committed (no {SUCCESS_NAME})") from exc
            raise
        if not isinstance(doc, dict) or not set(self.RESERVED_KEYS) <= doc.keys():
            got = f"keys {', '.join(sorted(doc)) or '(none)'}" if isinstance(doc, dict) else type(doc).__name__
            raise StorageError(
                self.success_uri,
                f"expected a stage's commit record (a JSON object with {' and '.join(self.RESERVED_KEYS)}), got "
                f"{got}; delete {self.uri} to redo that stage",
            )
        return doc
