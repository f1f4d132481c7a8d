"""Bootstrap's training images decoded once (pipeline.training_data): the cache holds what the per-epoch decode
gave, under both profiles, and its build is atomic, resumable and works on S3."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from benchmarks.bootstrap import write_bank
from transfgu_dist.config import load_config
from transfgu_dist.io import parts, storage, synthetic
from transfgu_dist.io.image_pool import load_images
from transfgu_dist.method.resizing import resizing
from transfgu_dist.pipeline import contract
from transfgu_dist.pipeline.training_data import (
    build_cache,
    cache_output,
    decode_rows,
    read_cache,
    training_dataset,
)


def config(root, output: str, profile: str = "reference", image: int = 64, train: int = 48):
    return load_config(
        overrides=[
            f"profile={profile}",
            f"output={output}",
            f"data.root={root}",
            "encoder.arch=vit_tiny_test",
            "encoder.weights=random",
            "data.synthetic_train=6",
            "data.limit=6",
            f"data.synthetic_size={image}",
            f"pseudo.image_size=[{train}, {train}]",
            f"train.image_size=[{train}, {train}]",
            "cluster.k_fg=2",
            "cluster.k_bg=2",
            "pseudo.batch_size=4",
        ]
    )


@pytest.mark.parametrize("profile", ["reference", "paper"])
@pytest.mark.parametrize("image", [64, 48])
def test_cache_holds_the_per_epoch_decode(tmp_path, profile, image):
    """The cached uint8 image / 255 is today's per-epoch decode (load_images at train.image_size by the profile's
    training resize, applied once) to within uint8 rounding, 0.5/255; exactly it where no resize is needed; an
    unreadable image is left out and named."""
    synthetic.write_dataset(tmp_path, 3, 0, size=(image, image))
    cfg = config(tmp_path, str(tmp_path / "out"), profile, image)
    paths = [f"images/train/{i:06d}.png" for i in range(3)] + ["images/train/gone.png"]
    table = pa.table({"image_id": ["0", "1", "2", "gone"], "path": paths, "scale": [1.0] * 4})
    kept, bad = decode_rows(table, cfg)
    uris = np.array([str(tmp_path / p) for p in paths[:3]])
    today = load_images({"uri": uris}, cfg.train.image_size, resizing(cfg.data).images)["image"]
    cached = parts.list_values(kept.column("image"), (48, 48, 3))
    assert cached.dtype == np.uint8 and kept.column("image_id").to_pylist() == ["0", "1", "2"]
    assert list(bad) == ["gone"] and "gone.png" in bad["gone"]
    assert np.abs(cached / np.float32(255) - today).max() <= 0.5 / 255 + 1e-6
    if image == 48:
        assert np.array_equal(cached / np.float32(255), today)


def test_an_empty_bank_part_caches_as_an_empty_part(tmp_path):
    """A bank part with no rows (its only image unreadable at pseudo_label) decodes to an empty part, not a crash."""
    cfg = config(tmp_path, str(tmp_path / "out"))
    kept, bad = decode_rows(pa.table({"image_id": pa.array([], pa.string()), "path": pa.array([], pa.string())}), cfg)
    assert (
        kept.num_rows == 0
        and bad == {}
        and kept.schema.field("image").type == parts.fixed_list(np.zeros((0, 48 * 48 * 3), np.uint8), pa.uint8()).type
    )


def test_cache_on_s3_is_resumable_and_rebuilt_for_another_size(tmp_path, shared_ray, s3_bucket):
    """Built on an s3:// output in the bank's row order, paths kept relative; a part lost before the commit is
    redone alone; a committed cache of another training size is rebuilt."""
    synthetic.write_dataset(tmp_path, 6, 0, size=(64, 64))
    cfg = config(tmp_path, f"{s3_bucket}/out")
    write_bank(cfg, 4)
    manifest = build_cache(cfg)
    out = cache_output(cfg)
    assert out.uri.startswith("s3://") and manifest["images"] == 6 and manifest["image_size"] == [48, 48]
    bank_out = contract.output(cfg, "pseudo_label")
    for name in bank_out.manifest()["parts"]:  # each bank part's rows, in its order, under its name
        ids = [parts.read_table([o.part_uri(name)], ["image_id"]).column(0).to_pylist() for o in (bank_out, out)]
        assert ids[0] == ids[1]
    assert sorted(r["image_id"] for r in read_cache(cfg).take_all()) == [f"{i:06d}" for i in range(6)]
    rows = training_dataset(cfg).take_all()
    assert len(rows) == 6 and rows[0]["image"].shape == (48, 48, 3) and rows[0]["terms"].shape == (4, 6, 6)
    table = parts.read_table(parts.part_uris(out), ["path"])
    assert sorted(table.column("path").to_pylist())[0] == "images/train/000000.png"
    names = sorted(manifest["parts"])
    before = storage.read_bytes(out.part_uri(names[-1]))
    storage.delete(out.success_uri)
    storage.delete(out.part_uri(names[-1]))
    assert build_cache(cfg)["parts"] == names and storage.read_bytes(out.part_uri(names[-1])) == before
    other = config(tmp_path, f"{s3_bucket}/out", train=32)
    assert build_cache(other)["image_size"] == [32, 32]
    assert training_dataset(other).take(1)[0]["image"].shape == (32, 32, 3)
