"""Stored form of the pseudo-label bank's response maps M^k (Eq. 7): float32 labels from a shared and per-concept terms.

The reference maps are A/max(A) (<= 1, the same for every concept) plus a per-concept gradient term of order 1e-4,
so summed and rounded to fp16 (resolution 2^-11 near 1) the top two concepts of most pixels collide. Stored here per
image instead:
- `shared`: the shared term, float32 (h*w),
- `terms`: the per-concept terms divided by a per-image power of two `scale` (so the largest is in [0.5, 1]),
  `pseudo.terms_dtype` (K*h*w), NaN where M^k is forced to 0: float32 (reference: the authors' fp32 maps, the same
  4 bytes a value, every argmax kept) or float16 (half the size; top-two gaps below one fp16 step of the terms,
  2^-11 of the largest, flip: 99.6% / 99.4% of the argmax kept at K = 27 / 171 on ViT-S/8 maps),
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


def encode(
    shared: torch.Tensor, terms: torch.Tensor, dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, h, w) shared and (B, K, h, w) terms -> float32 (B, h*w), `dtype` (B, K*h*w), float32 (B,) scale."""
    peak = terms.float().nan_to_num(0.0).abs().flatten(1).amax(1)
    scale = torch.exp2(torch.ceil(torch.log2(peak.clamp_min(2.0**-100))))
    scaled = (terms.float() / scale.view(-1, 1, 1, 1)).to(getattr(torch, dtype))
    return (
        shared.float().flatten(1).cpu().numpy(),
        scaled.flatten(1).cpu().numpy(),
        scale.cpu().numpy().astype(np.float32),
    )


def columns(shared: torch.Tensor, terms: torch.Tensor, dtype: str = "float32") -> dict[str, pa.Array]:
    """The bank's map columns of a batch of images, terms in `dtype` (see the module docstring)."""
    s, t, scale = encode(shared, terms, dtype)
    return {
        "shared": parts.fixed_list(s, pa.float32()),
        "terms": parts.fixed_list(t, pa.from_numpy_dtype(t.dtype)),
        "scale": pa.array(scale, pa.float32()),
    }


def decode(shared: torch.Tensor, terms: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Response maps (B, K, h, w) float32 from shared (B, h, w), terms (B, K, h, w) and scale (B,)."""
    return compose(shared.float(), terms.float() * scale.float().view(-1, 1, 1, 1))


def check_part(uri: str, terms_dtype: str = "float32") -> None:
    """A bank part written in another form (the older summed fp16 `maps`, absolute image `uri`s instead of `path`s
    relative to data.root, or terms of another dtype than `pseudo.terms_dtype`) fails here in one line."""
    fs, path = storage.filesystem(uri)
    schema = pq.read_schema(path, filesystem=fs)
    if not {"path", *COLUMNS} <= set(schema.names):
        raise ValueError(
            f"{uri}: expected the pseudo-label bank columns path, {', '.join(COLUMNS)}, got {', '.join(schema.names)} "
            f"(a bank from an older version: rerun pseudo_label)"
        )
    got = schema.field("terms").type.value_type.to_pandas_dtype().__name__
    if got != terms_dtype:
        raise ValueError(
            f"{uri}: expected bank terms of {terms_dtype} (pseudo.terms_dtype), got {got} "
            f"(a bank made with other settings or an older version: rerun pseudo_label, or set pseudo.terms_dtype)"
        )


def bytes_per_image(k: int, h: int, w: int, terms_dtype: str = "float32") -> int:
    """Raw (uncompressed) size of one image's maps in this form: K*h*w terms + h*w fp32 + one fp32."""
    return np.dtype(terms_dtype).itemsize * k * h * w + 4 * h * w + 4


def read(out: StageOutput, terms_dtype: str = "float32") -> ray.data.Dataset:
    """The committed bank `out` as a Ray dataset of its rows (the one reader of bank parts), terms of `terms_dtype`."""
    uris = parts.part_uris(out)
    check_part(uris[0], terms_dtype)
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
    batch's device: fp16 terms, when chosen, cross the object store)."""
    rest = {k: v for k, v in batch.items() if k not in COLUMNS}
    return {**rest, "maps": decode(batch["shared"], batch["terms"], batch["scale"])}
