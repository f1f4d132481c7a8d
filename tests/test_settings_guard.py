"""The settings guard: outputs made with other settings are refused in one line naming the keys, found
from the manifests, parts and Ray Train checkpoints themselves (no config.yaml needed), under `source=` too."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from transfgu_dist.config import ConfigError, load_config
from transfgu_dist.io import parts
from transfgu_dist.pipeline import contract, settings_guard
from transfgu_dist.pipeline.cli import check_output

STAGES = list(contract.STAGES)
# one setting of each stage's own inputs, changed
CHANGED = {
    "extract": "crops.fg_min=0.6",
    "cluster": "cluster.k_fg=5",
    "pseudo_label": "pseudo.similarity=dot",
    "bootstrap": "train.lr=0.5",
    "evaluate": "eval.n_overlays=3",
}


def commit(cfg, *names):
    for name in names:
        contract.output(cfg, name).commit({"settings": settings_guard.record(cfg, name)})


def refused(cfg, stages, key):
    with pytest.raises(ConfigError, match=rf"made with other settings \({key}: ") as e:
        settings_guard.check(cfg, stages)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("stage", STAGES)
def test_one_changed_setting_per_stage_is_refused_by_it_and_every_stage_downstream(tmp_path, stage):
    base = [f"output={tmp_path}"]
    commit(load_config(overrides=base), *STAGES)
    cfg = load_config(overrides=[*base, CHANGED[stage]])
    key = CHANGED[stage].split("=")[0]
    for job in STAGES[STAGES.index(stage) :]:
        message = refused(cfg, [job], key)
        assert message.startswith(contract.folder_uri(cfg, stage))  # the first stage made with the old value
    for job in STAGES[: STAGES.index(stage)]:
        settings_guard.check(cfg, [job])  # stages upstream of the change do not depend on it
    # what only changes speed (or the evaluated checkpoint's folder) is not refused
    settings_guard.check(load_config(overrides=[*base, "eval.batch_size=7", "train.cpus_per_worker=3"]), STAGES)


def test_refused_with_config_yaml_deleted(tmp_path):
    """check_output needs no config.yaml: the manifests carry the settings and their values."""
    cfg = load_config(overrides=[f"output={tmp_path}"])
    commit(cfg, "extract", "cluster")
    check_output(cfg, STAGES)
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(
        ConfigError,
        match=r"concepts: committed results made with other settings "
        r"\(cluster\.k_fg: 4 -> 5\)",
    ):
        check_output(load_config(overrides=[f"output={tmp_path}", "cluster.k_fg=5"]), STAGES)
    assert not (tmp_path / "config.yaml").exists()  # nothing recorded by a refused job


def test_refused_through_source(tmp_path):
    """A run reusing another output's bank (a sweep's best.yaml) is checked against that bank's settings."""
    src = tmp_path / "source"
    commit(load_config(overrides=[f"output={src}"]), "extract", "cluster", "pseudo_label")
    run = [f"output={tmp_path / 'best'}", f"source={src}", f"data.root={src / 'data'}"]  # its data root is portable
    settings_guard.check(load_config(overrides=run), STAGES)
    for change in ("seed=7", "crops.crop_size=16", "cluster.niter=3", "pseudo.similarity=dot"):
        message = refused(load_config(overrides=[*run, change]), STAGES, change.split("=")[0])
        assert str(src) in message and str(tmp_path / "best") not in message


def test_uncommitted_parts_made_with_other_settings_are_refused(tmp_path):
    """pseudo_label resumed with pseudo.similarity=dot over cosine parts: refused, never a bank of both."""
    base = [f"output={tmp_path}"]
    cfg = load_config(overrides=base)
    commit(cfg, "extract", "cluster")
    out = contract.output(cfg, "pseudo_label")
    name = parts.write_part(
        out, pa.table({"image_id": ["a"]}, metadata=settings_guard.part_metadata(cfg, "pseudo_label")), ["a"], []
    )
    settings_guard.check(cfg, ["pseudo_label"])
    message = refused(load_config(overrides=[*base, "pseudo.similarity=dot"]), ["pseudo_label"], "pseudo.similarity")
    assert f"a part ({name})" in message
    parts.write_part(out, pa.table({"image_id": ["b"]}), ["b"], [])  # a part with no settings record
    with pytest.raises(ConfigError, match=r"made with other settings \(.*pseudo\.similarity: \(unset\) -> cos"):
        settings_guard.check(cfg, ["pseudo_label"])


def test_ray_train_checkpoints_made_with_other_settings_are_refused(tmp_path):
    base = [f"output={tmp_path}"]
    cfg = load_config(overrides=base)
    commit(cfg, "extract", "cluster", "pseudo_label")
    d = tmp_path / "ray_train" / "bootstrap"
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_killed"):
        (d / name).mkdir(parents=True)
        (d / name / "state.pt").write_bytes(b"x")
    (d / settings_guard.TRAIN_SNAPSHOT).write_text(
        json.dumps(
            {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a"}, {"checkpoint_dir_name": "checkpoint_b"}]}
        )
    )
    with pytest.raises(ConfigError, match=r"bootstrap: Ray Train checkpoints made with other settings"):
        settings_guard.check(cfg, ["bootstrap"])  # no record: not known to be this config's
    settings_guard.prepare_train_dir(cfg)  # the unregistered folder of a killed attempt goes; the record is written
    assert sorted(p.name for p in d.iterdir()) == [
        "checkpoint_a",
        "checkpoint_b",
        settings_guard.TRAIN_SNAPSHOT,
        settings_guard.TRAIN_RECORD,
    ]
    settings_guard.check(cfg, ["bootstrap"])
    refused(load_config(overrides=[*base, "decoder.n_layers=3"]), ["bootstrap"], "decoder.n_layers")
    settings_guard.check(load_config(overrides=[*base, "eval.n_overlays=5"]), ["bootstrap"])  # evaluate's only


def test_single_stage_job_keeps_other_stages_recorded_settings(tmp_path):
    """A job of some stages records only its own settings in config.yaml: the committed evaluate keeps the eval
    section it was made with."""
    base = [f"output={tmp_path}"]
    cfg = load_config(overrides=[*base, "eval.n_overlays=2"])
    commit(cfg, *STAGES)
    check_output(cfg, STAGES)
    check_output(load_config(overrides=[*base, "eval.n_overlays=5"]), ["extract"])
    assert load_config(tmp_path / "config.yaml").eval.n_overlays == 2


@pytest.mark.parametrize(
    "key, values",
    [
        ("crops.batch_size", (64, 5)),
        ("crops.images_per_part", (256, 4)),
        ("pseudo.batch_size", (4, 3)),
        ("pseudo.images_per_part", (6, 4)),
        ("train.num_workers", (1, 2)),
    ],
)
def test_keys_that_change_outputs_are_settings_inputs(tmp_path, key, values):
    """pseudo.batch_size and pseudo.images_per_part cut the Grad-CAM batches whose loss the reference averages
    (test_fidelity: 1/len(batch)); the crops batch and part sizes change the crop features (by up to 1e-6: other
    encoder batch shapes); train.num_workers shards the data and the augmentation streams. A resume with another
    value is refused, naming the key."""
    stage = {"crops": "extract", "pseudo": "pseudo_label", "train": "bootstrap"}[key.split(".")[0]]
    old, new = (load_config(overrides=[f"output={tmp_path}", f"{key}={v}"]) for v in values)
    assert settings_guard.changes(settings_guard.record(old, stage), settings_guard.record(new, stage)) == [
        f"{key}: {values[0]} -> {values[1]}"
    ]
