"""Damaged outputs and inputs: named in one line, never trained on."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from transfgu_dist.config import load_config
from transfgu_dist.io import parts
from transfgu_dist.io.concepts_file import load_concepts
from transfgu_dist.io.datasets import image_uri, relative_path
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.io.storage_errors import StorageError
from transfgu_dist.pipeline import contract


def test_garbage_concepts_npz_names_the_file(tmp_path):
    cfg = load_config(overrides=[f"output={tmp_path}"])
    path = tmp_path / "concepts" / "concepts.npz"
    path.parent.mkdir()
    for garbage in (b"not an npz at all", None):
        if garbage is None:  # a valid .npz that needs pickle: refused, not unpickled
            np.savez(path, centroids=np.array([{"a": 1}], dtype=object))
        else:
            path.write_bytes(garbage)
        with pytest.raises(StorageError, match=rf"{path}: expected the cluster stage's \.npz") as e:
            load_concepts(contract.output(cfg, "cluster"))
        assert "\n" not in str(e.value) and "pickled" not in str(e.value)


def test_garbage_config_yaml_names_the_file(tmp_path):
    from transfgu_dist.config import ConfigError
    from transfgu_dist.pipeline.cli import check_output

    cfg = load_config(overrides=[f"output={tmp_path}"])
    for garbage, expected in (
        (b"\x00\xff: [unclosed", "expected the YAML settings"),
        (b"just text", "expected a mapping"),
    ):
        (tmp_path / "config.yaml").write_bytes(garbage)
        with pytest.raises(ConfigError, match=f"{tmp_path / 'config.yaml'}: {expected}") as e:
            check_output(cfg, ["extract"])
        assert "\n" not in str(e.value)


def test_image_paths_relative_to_the_data_root():
    cfg = load_config(overrides=["data.root=/data/coco", "output=/runs/a"])
    assert relative_path(cfg, "/data/coco/images/train2017/1.jpg") == "images/train2017/1.jpg"
    assert image_uri(cfg, "images/train2017/1.jpg") == "/data/coco/images/train2017/1.jpg"
    assert relative_path(cfg, "/elsewhere/1.jpg") == image_uri(cfg, "/elsewhere/1.jpg") == "/elsewhere/1.jpg"
    moved = load_config(overrides=["output=/runs/b"])  # synthetic data under the output: follows it
    assert image_uri(moved, "images/train/000001.png") == "/runs/b/data/images/train/000001.png"
    s3 = load_config(overrides=["data.root=s3://bucket/voc/"])
    assert relative_path(s3, "s3://bucket/voc/JPEGImages/a.jpg") == "JPEGImages/a.jpg"
    assert image_uri(s3, "JPEGImages/a.jpg") == "s3://bucket/voc/JPEGImages/a.jpg"


def test_bad_images_keep_their_reasons(tmp_path):
    out = StageOutput(str(tmp_path / "bank"))
    name = parts.write_part(out, pa.table({"image_id": ["a"]}), ["a"], ["b", "c"], {"b": "b.png: not an image"})
    cover = parts.coverage(out)
    assert cover[name] == ({"a"}, {"b", "c"})
    assert parts.bad_reasons(out, cover) == {"b": "b.png: not an image", "c": "unreadable"}


@pytest.mark.parametrize("record, got", [("[]", "list"), ("{}", "keys (none)"), ('{"settings": {}}', "keys settings")])
def test_commit_record_of_another_form_names_the_file(tmp_path, record, got):
    out = StageOutput(str(tmp_path / "features"))
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "_SUCCESS.json").write_text(record)
    with pytest.raises(StorageError) as e:
        out.manifest()
    assert str(e.value) == (
        f"{out.success_uri}: expected a stage's commit record (a JSON object with parts and committed_at), got {got}; "
        f"delete {out.uri} to redo that stage"
    )


def test_each_rank_resumes_its_own_random_streams():
    """Rank r's augmentation stream is seeded with train.seed + r: restored from its own saved state it continues
    bit for bit (the Train loop saves rng-<rank>.pt per rank), restored from rank 0's it does not."""
    import torch

    from transfgu_dist.io.weights import build_encoder
    from transfgu_dist.method.bootstrapping import Bootstrapper

    cfg = load_config(overrides=["encoder.arch=vit_tiny_test", "encoder.weights=random"])
    is_fg = np.arange(cfg.n_concepts) < cfg.cluster.k_fg

    def worker(rank: int) -> Bootstrapper:
        return Bootstrapper(cfg, build_encoder(cfg.encoder), is_fg, torch.device("cpu"), rank=rank)

    def draws(boot: Bootstrapper) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(4, generator=boot.gen), torch.rand(4)  # augmentations, dropout

    zero, one = worker(0), worker(1)
    draws(zero), draws(one)  # epoch 0
    saved = {0: {**zero.state(0, 0), "best": {}}, 1: one.rng_state()}
    expected = draws(one)  # rank 1's epoch 1, uninterrupted
    resumed = worker(1)
    resumed.load({**saved[0], "rng": saved[1]})
    assert all(torch.equal(a, b) for a, b in zip(draws(resumed), expected))
    wrong = worker(1)
    wrong.load(saved[0])  # rank 0's streams
    assert not torch.equal(draws(wrong)[0], expected[0])
