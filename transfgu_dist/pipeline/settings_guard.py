"""The settings guard: every stage output carries the settings it was made with, checked before a resume.

A stage's settings are the values of its config inputs and its upstream stages' (transfgu_dist.pipeline.contract),
with a hash of them. They are recorded in the stage's manifest (`settings`), in the footer of each Parquet part (the
label-free stages) and beside the Ray Train checkpoints of the bootstrap stage, so the check needs no
`config.yaml` and reads the outputs where they live (`source` for reused ones). A mismatch is refused in one line
naming the keys and values, never recomputed: the outputs made with the other settings are the user's to keep or
delete. Imports neither Ray nor torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from transfgu_dist.config import Config, ConfigError, to_dict
from transfgu_dist.io import storage
from transfgu_dist.io.stage_output import TMP_DIR_NAME
from transfgu_dist.pipeline import contract

SETTINGS_KEY = b"transfgu.settings"  # Parquet footer key of a part's settings record
TRAIN_RECORD = "transfgu_settings.json"  # beside the Ray Train checkpoints
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of registered checkpoints


def portable(cfg: Config) -> dict[str, Any]:
    """`to_dict(cfg)`, with a data root that is the default `<inputs root>/data` recorded as "" (a copied or moved
    output keeps its settings)."""
    values = to_dict(cfg)
    if cfg.data.root and cfg.data.root.rstrip("/") == storage.join(cfg.inputs_root, "data"):
        values["data"]["root"] = ""
    return values


def record(cfg: Config, name: str) -> dict[str, Any]:
    """The settings stage `name` is made with: {"hash": ..., "values": {"section.key": value}}."""
    values = contract.input_values(portable(cfg), name, with_upstream=True)
    return {"hash": hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16], "values": values}


def part_metadata(cfg: Config, name: str) -> dict[bytes, bytes]:
    """Parquet schema metadata recording a part's settings (parts.write_part keeps it in the footer)."""
    return {SETTINGS_KEY: json.dumps(record(cfg, name)).encode()}


def changes(recorded: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """`key: old -> new` for each input that differs; [] when the hashes agree."""
    if recorded is not None and recorded.get("hash") == current["hash"]:
        return []
    old, new = (recorded or {}).get("values", {}), current["values"]
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "(unset)") != new.get(k, "(unset)"))
    return [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys] or [
        f"settings hash {(recorded or {}).get('hash')} -> {current['hash']}"
    ]


def refuse(uri: str, what: str, diff: list[str]) -> ConfigError:
    return ConfigError(
        f"{uri}: {what} made with other settings ({'; '.join(diff)}); use another output= (or "
        f"source=), or delete {uri} to redo it with these"
    )


def train_dir(cfg: Config) -> str:
    """The bootstrap stage's Ray Train run folder (checkpoints of every epoch)."""
    return storage.join(cfg.output, "ray_train", "bootstrap")


def _check_parts(cfg: Config, name: str) -> None:
    out, current = contract.output(cfg, name), record(cfg, name)
    for uri in storage.list_files(out.uri, (".parquet",)):
        if f"/{TMP_DIR_NAME}/" in uri:
            continue
        fs, path = storage.filesystem(uri)
        try:
            meta = pq.read_schema(path, filesystem=fs).metadata or {}
        except (OSError, ValueError):  # unreadable (ArrowInvalid is a ValueError): the resume's part checks report it
            continue
        recorded = json.loads(meta[SETTINGS_KEY]) if SETTINGS_KEY in meta else None
        if diff := changes(recorded, current):
            raise refuse(out.uri, f"a part ({uri.rsplit('/', 1)[-1]})", diff)


def _check_train_dir(cfg: Config) -> None:
    d = train_dir(cfg)
    files = storage.list_files(d)
    if not any(f.rsplit("/", 1)[-1] == "state.pt" for f in files):
        return  # no checkpoint to resume from
    uri = storage.join(d, TRAIN_RECORD)
    recorded = storage.read_json(uri) if storage.exists(uri) else None
    if diff := changes(recorded, record(cfg, "bootstrap")):
        raise refuse(d, "Ray Train checkpoints", diff)


def check(cfg: Config, stages: Sequence[str]) -> None:
    """Refuse (ConfigError, one line) a job whose stages, or the upstream stages they read, hold outputs made with
    other settings: committed manifests, published parts and Ray Train checkpoints alike."""
    needed = [n for n in contract.STAGES if n in stages or any(n in contract.upstream(s) for s in stages)]
    for name in needed:
        out = contract.output(cfg, name)
        if out.is_committed():
            if diff := changes(out.manifest().get("settings"), record(cfg, name)):
                raise refuse(out.uri, "committed results", diff)
        elif name in stages:
            _check_parts(cfg, name)
            if name == "bootstrap":
                _check_train_dir(cfg)


def prepare_train_dir(cfg: Config) -> None:
    """Before training (the lease held): delete checkpoint folders Ray Train never registered (an attempt killed
    while writing one), then record the settings the checkpoints are made with."""
    d = train_dir(cfg)
    snapshot = storage.join(d, TRAIN_SNAPSHOT)
    registered = (
        {c["checkpoint_dir_name"] for c in storage.read_json(snapshot).get("checkpoint_results", [])}
        if storage.exists(snapshot)
        else set()
    )
    rel = [f[len(d) :].strip("/") for f in storage.list_files(d)]
    folders = {r.split("/", 1)[0] for r in rel if "/" in r}  # not the snapshot file beside them
    for name in sorted(n for n in folders if n.startswith("checkpoint_") and n not in registered):
        storage.delete(storage.join(d, name))
    storage.write_json(storage.join(d, TRAIN_RECORD), record(cfg, "bootstrap"))
