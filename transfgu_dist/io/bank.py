"""Stored form of the pseudo-label bank's response maps M^k (Eq. 7), at fp16 size and fp32 labels.

The reference maps are A/max(A) (<= 1, the same for every concept) plus a per-concept gradient term of order 1e-4,
so summed and rounded to fp16 (resolution 2^-11 near 1) the top two concepts of most pixels collide: the argmax of
about a quarter of the pixels changed. Stored here per image instead:
- `shared`: the shared term, float32 (h*w),
- `terms`: the per-concept terms divided by a per-image power of two `scale` (so the largest is in [0.5, 1] and
  fp16's relative precision holds down to 2^-14 of it), float16 (K*h*w), NaN where M^k is forced to 0,
- `scale`: float32.
`decode` rebuilds M^k = shared + scale * term in float32 (0 at NaN); multiplying by a power of two is exact.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from transfgu_dist.io import parts, storage
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.method.gradcam import compose

COLUMNS = ("shared", "terms", "scale")


def encode(shared: torch.Tensor, terms: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, h, w) shared and (B, K, h, w) terms -> float32 (B, h*w), float16 (B, K*h*w), float32 (B,) scale."""
    peak = terms.float().nan_to_num(0.0).abs().flatten(1).amax(1)
    scale = torch.exp2(torch.ceil(torch.log2(peak.clamp_min(2.0**-100))))
    scaled = (terms.float() / scale.view(-1, 1, 1, 1)).to(torch.float16)
    return (
        shared.float().flatten(1).cpu().numpy(),
        scaled.flatten(1).cpu().numpy(),
        scale.cpu().numpy().astype(np.float32),
    )


def columns(shared: torch.Tensor, terms: torch.Tensor) -> dict[str, pa.Array]:
    """The bank's map columns of a batch of images (see the module docstring)."""
    s, t, scale = encode(shared, terms)
    return {
        "shared": parts.fixed_list(s, pa.float32()),
        "terms": parts.fixed_list(t, pa.float16()),
        "scale": pa.array(scale, pa.float32()),
    }


def decode(shared: torch.Tensor, terms: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Response maps (B, K, h, w) float32 from shared (B, h, w), terms (B, K, h, w) and scale (B,)."""
    return compose(shared.float(), terms.float() * scale.float().view(-1, 1, 1, 1))


def check_part(uri: str) -> None:
    """A bank part written in another form (e.g. the older summed fp16 `maps`, or absolute image `uri`s instead of
    `path`s relative to data.root) fails here in one line."""
    fs, path = storage.filesystem(uri)
    names = pq.read_schema(path, filesystem=fs).names
    if not {"path", *COLUMNS} <= set(names):
        raise ValueError(
            f"{uri}: expected the pseudo-label bank columns path, {', '.join(COLUMNS)}, got {', '.join(names)} "
            f"(a bank from an older version: rerun pseudo_label)"
        )


def bytes_per_image(k: int, h: int, w: int) -> int:
    """Raw (uncompressed) size of one image's maps in this form: K*h*w fp16 + h*w fp32 + one fp32."""
    return 2 * k * h * w + 4 * h * w + 4


def read(out: StageOutput) -> ray.data.Dataset:
    """The committed bank `out` as a Ray dataset of its rows (the one reader of bank parts)."""
    uris = parts.part_uris(out)
    check_part(uris[0])
    fs, _ = storage.filesystem(uris[0])
    # the committed part list is known: Ray 2.60's default (V2) reader would list it again with a pool of 32
    # footer-reading actors per read, seconds of process start-up per epoch on a small node
    ray.data.DataContext.get_current().use_datasource_v2 = False
    return ray.data.read_parquet([storage.filesystem(u)[1] for u in uris], filesystem=fs)


def paths(out: StageOutput) -> list[str]:
    """The image paths (relative to data.root) of the committed bank `out`, one per row."""
    uris = parts.part_uris(out)
    check_part(uris[0])
    return parts.read_table(uris, ["path"]).column("path").to_pylist()


def unpack(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch of bank rows as arrays: shared (n, h, w), terms (n, K, h, w), scale (n,), fg_prior (n, h, w)."""
    n, (h, w) = len(batch["scale"]), batch["grid"][0]
    return {
        "shared": np.stack(batch["shared"]).reshape(n, h, w),
        "terms": np.stack(batch["terms"]).reshape(n, -1, h, w),
        "scale": np.asarray(batch["scale"]),
        "fg_prior": np.stack(batch["fg_prior"]).reshape(n, h, w),
    }


def with_maps(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of unpacked rows with shared, terms and scale replaced by the fp32 `maps` they decode to (on the
    batch's device: fp16 terms cross the object store)."""
    rest = {k: v for k, v in batch.items() if k not in COLUMNS}
    return {**rest, "maps": decode(batch["shared"], batch["terms"], batch["scale"])}
