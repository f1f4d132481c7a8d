"""Cluster names a person gives after a label-free run (predict's and export's `names=`): a YAML mapping
(`3: person`) or list, or a CSV of `id,name` lines (a header line allowed). Clusters not named keep `cluster <k>`."""

from __future__ import annotations

import csv
import io

import yaml

from transfgu_dist.io import storage

EXPECTED = "a YAML mapping of cluster id -> name (e.g. `3: person`) or list, or a CSV of `id,name` lines"


def parse_names(text: str, uri: str) -> dict[int, str]:
    """cluster id -> name as written in the file `uri` (by its suffix: .csv, else YAML)."""
    if uri.lower().endswith(".csv"):
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
        if rows and not rows[0][0].strip().isdigit():
            rows = rows[1:]  # a header
        pairs = [(r[0].strip(), ",".join(r[1:]).strip()) for r in rows]
    else:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"names={uri}: expected {EXPECTED}; not YAML ({str(e).splitlines()[0]})") from None
        doc = dict(enumerate(doc)) if isinstance(doc, list) else doc
        if not isinstance(doc, dict):
            raise ValueError(f"names={uri}: expected {EXPECTED}; got {type(doc).__name__}")
        pairs = [(str(k).strip(), str(v).strip()) for k, v in doc.items()]
    bad = [k for k, _ in pairs if not k.isdigit()]
    if bad or not pairs:
        raise ValueError(f"names={uri}: expected {EXPECTED}; " + (f"cluster id {bad[0]!r}" if bad else "no names"))
    return {int(k): v for k, v in pairs}


def read_names(uri: str, n_clusters: int) -> list[str]:
    """One name per cluster from the file `uri` (local or s3://); an id outside [0, n_clusters) is a mistake."""
    if not storage.exists(uri):
        raise ValueError(f"names={uri}: does not exist (expected {EXPECTED})")
    named = parse_names(storage.read_bytes(uri).decode(), uri)
    outside = sorted(k for k in named if k >= n_clusters)
    if outside:
        raise ValueError(f"names={uri}: cluster id {outside[0]}: the model has clusters 0 to {n_clusters - 1}")
    return [named.get(k, f"cluster {k}") for k in range(n_clusters)]
