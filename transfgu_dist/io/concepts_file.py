"""The cluster stage's concepts file, `concepts.npz` (centroids, is_fg, k-means objective), written once by cluster
and read by pseudo_label, bootstrap and evaluate's Table 3."""

from __future__ import annotations

import io

import numpy as np

from transfgu_dist.io import storage
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.io.storage_errors import StorageError
from transfgu_dist.method.concepts import Concepts

FILE = "concepts.npz"


def write_concepts(out: StageOutput, concepts: Concepts) -> None:
    buf = io.BytesIO()
    np.savez(buf, **concepts.to_arrays())
    out.write_part(FILE, buf.getvalue())


def load_concepts(out: StageOutput) -> Concepts:
    """The concepts of the committed cluster output `out`; an unreadable file fails in one line naming it."""
    uri = out.part_uri(FILE)
    data = storage.read_bytes(uri)
    try:
        if not data.startswith(b"PK"):  # np.load would take other bytes for a pickle and say so
            raise ValueError(f"not an .npz (zip) archive: starts with {data[:8]!r}")
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return Concepts.from_arrays(dict(arrays))
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise StorageError(
            uri,
            f"expected the cluster stage's .npz of centroids and is_fg; could not read it ({e}); "
            f"delete {out.uri} to redo the cluster stage",
        ) from None
