"""One validation pass before Ray or MLflow start: every config, path, data and weights mistake as one line.

`check(cfg)` raises ConfigError (or the dataset / storage / encoder error naming the path) for: a data root
missing or not in its layout (each split is listed), an output that cannot be written (a probe file is
written and removed), and a sample of the val labels that do not decode to a single-channel map of their image's
size (labels are never resized).
"""

from __future__ import annotations

import io
import logging
import uuid

from transfgu_dist.config import Config, ConfigError
from transfgu_dist.io import storage

log = logging.getLogger("transfgu_dist")

LABEL_SAMPLE = 8  # val labels decoded before any compute (evenly spaced over the split)


def check_output(cfg: Config) -> None:
    """Write and remove a probe file under `output` (an unwritable output says so, not 'does not exist')."""
    check_writable("output", cfg.output)


def check_writable(key: str, uri: str) -> None:
    """Write and remove a probe file under the folder `uri` given as `key=`."""
    probe = storage.join(uri, f".preflight-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except Exception as e:  # noqa: BLE001 - permission, read-only filesystem, bucket policy: all one answer
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"{key}={uri}: not writable (expected a folder or s3:// prefix this process can "
            f"write; a probe file failed: {reason})"
        ) from e


def check_labels(samples: list, n: int = LABEL_SAMPLE) -> int:
    """Decode up to `n` evenly spaced labels and compare each with its image's size; returns how many."""
    from PIL import Image

    from transfgu_dist.io.images import decode_label

    labelled = [s for s in samples if s.label]
    picked = labelled[:: max(1, len(labelled) // n)][:n]
    for s in picked:
        label = decode_label(storage.read_bytes(s.label), s.label)
        with Image.open(io.BytesIO(storage.read_bytes(s.image))) as img:
            w, h = img.size
        if label.shape != (h, w):
            raise ConfigError(
                f"{s.label}: label is {label.shape[1]}x{label.shape[0]} but its image {s.image} is "
                f"{w}x{h} (expected the same size; labels are not resized)"
            )
    return len(picked)


def check(cfg: Config, stages: list[str] | tuple[str, ...]) -> None:
    """All checks, cheapest first; logs one line with what the data root holds."""
    from transfgu_dist.io.datasets import ensure_synthetic, list_samples

    check_output(cfg)
    if cfg.data.root and cfg.data.layout != "synthetic" and not storage.exists(cfg.data.root):
        raise ConfigError(f"data.root={cfg.data.root}: does not exist (expected a '{cfg.data.layout}' dataset root)")
    ensure_synthetic(cfg)
    counts = {}
    if {"extract", "pseudo_label", "bootstrap"} & set(stages):
        counts[cfg.data.train_split] = len(list_samples(cfg, cfg.data.train_split))
    checked = 0
    if cfg.data.layout != "folder" and {"bootstrap", "evaluate"} & set(stages):
        val = list_samples(cfg, cfg.data.val_split)
        counts[cfg.data.val_split] = len(val)
        checked = check_labels(val)
    log.info(
        "data %s (%s): %s; %d val labels checked",
        cfg.data_root,
        cfg.data.layout,
        ", ".join(f"{n} {split} images" for split, n in counts.items()),
        checked,
    )
