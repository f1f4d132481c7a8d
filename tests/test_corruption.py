"""Damaged committed outputs are found where the next stage reads them, in one line naming the file and what was
expected: a truncated or deleted Parquet part, and a garbage decoder checkpoint or export."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from transfgu_dist.config import Config
from transfgu_dist.inference.segmenter import CheckpointError, Segmenter, load_decoder
from transfgu_dist.io import parts
from transfgu_dist.io.storage_errors import StorageError


def commit_parts(out, n_parts: int = 3) -> list[str]:
    """`n_parts` tiny feature parts, committed with their part_records as the stages commit them."""
    rng = np.random.default_rng(0)
    names = [
        parts.write_part(
            out,
            pa.table(
                {
                    "is_fg": pa.array(rng.random(4) < 0.5),
                    "feature": parts.fixed_list(rng.random((4, 6)).astype(np.float16), pa.float16()),
                }
            ),
            [str(i)],
            [],
        )
        for i in range(n_parts)
    ]
    out.commit({"part_records": parts.records(out, parts.coverage(out))})
    return names


@pytest.mark.parametrize("reader", ["cluster", "bootstrap"])
@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_damaged_part_is_named_by_the_next_stage(tmp_path, reader, damage):
    """The cluster stage reading the features and the bootstrap stage reading the bank refuse a damaged part
    before any Parquet read (no ArrowInvalid traceback, no Ray started)."""
    from transfgu_dist.pipeline import contract

    cfg = Config(output=str(tmp_path))
    out = contract.output(cfg, "extract" if reader == "cluster" else "pseudo_label")
    names = commit_parts(out)
    assert parts.part_uris(out) == [out.part_uri(n) for n in sorted(names)]  # intact: the committed list
    path = tmp_path.joinpath(*out.part_uri(names[1]).removeprefix(str(tmp_path)).strip("/").split("/"))
    size = path.stat().st_size
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: size // 2])
        expected = f"{names[1]}: part is {size // 2} bytes, the manifest records {size} .*delete {out.uri} to redo"
    else:
        path.unlink()
        expected = f"{names[1]}: part recorded in the committed manifest is missing \\(expected {size} bytes, 4 rows\\)"
    if reader == "cluster":
        from transfgu_dist.pipeline.stages.cluster import run_cluster

        with pytest.raises(StorageError, match=expected) as e:
            run_cluster(cfg)
    else:
        from transfgu_dist.pipeline.training_data import build_cache

        with pytest.raises(StorageError, match=expected) as e:
            build_cache(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"garbage, not a checkpoint", "truncated"])
def test_garbage_checkpoint_fails_in_one_line_naming_the_file(tmp_path, content):
    """final.pt / best.pt (evaluate's load_decoder) and an export (Segmenter.from_checkpoint): one line naming the
    file and what was expected, for random bytes and for a real checkpoint cut in half."""
    path = tmp_path / "final.pt"
    if content == "truncated":
        torch.save({"decoder": {"w": torch.zeros(64, 64)}, "n_outputs": 3, "encoder": {}, "round": 0}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    cfg = Config(output=str(tmp_path))
    for load in (lambda: load_decoder(str(path), cfg), lambda: Segmenter.from_checkpoint(str(path))):
        with pytest.raises(CheckpointError) as e:
            load()
        msg = str(e.value)
        assert msg.startswith(f"{path}: not a readable PyTorch checkpoint; expected ") and "\n" not in msg, msg
        assert "truncated" in msg if content != b"garbage, not a checkpoint" else "unpickler" in msg, msg


def test_export_missing_keys_named(tmp_path):
    """An artifact with the export format tag but a key missing names the file and the missing key."""
    from transfgu_dist.inference.segmenter import ARTIFACT_FORMAT

    path = tmp_path / "segmenter.pt"
    torch.save({"format": ARTIFACT_FORMAT, "decoder": {}}, path)
    with pytest.raises(CheckpointError, match=f"{path}: expected an exported segmenter .*missing .*encoder"):
        Segmenter.from_checkpoint(str(path))
