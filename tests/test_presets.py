"""Presets resolve to the values the authors' configs give; `Config()` is the reference profile; sizes derive."""

import typing

import pytest

from transfgu_dist.config import PROFILES, Config, ConfigError, DataConfig, derive_sizes, load_config, to_dict
from transfgu_dist.io.datasets import READERS


def flat(cfg):
    return {
        f"{s}.{k}" if isinstance(sec, dict) else s: v
        for s, sec in to_dict(cfg).items()
        for k, v in (sec.items() if isinstance(sec, dict) else [(None, sec)])
    }


REFERENCE = {
    "pseudo.similarity": "cosine",
    "pseudo.response": "reference",
    "pseudo.loss_scale": None,
    "pseudo.split_fg_bg": False,
    "decoder.mask_head": "cosine_ln",
    "loss.alpha_step": 0.01,
    "loss.diversity": "reference",
    "loss.label_norm": "minmax",
    "crops.window_rule": "reference",
    "decoder.block_eps": 1e-5,
    "decoder.class_init": "orthogonal",
    "train.best_by": "miou_plus_acc",
    "train.skip_nonpositive_loss": True,
    "train.per_batch_augment": True,
    "train.drop_last": True,
    "data.resize": "reference",
}


def test_defaults_are_the_reference_profile():
    defaults, loaded = flat(Config()), flat(load_config(profile="reference"))
    assert set(REFERENCE) == set(PROFILES["paper"])
    assert {k: defaults[k] for k in REFERENCE} == REFERENCE
    differ = {k: (defaults[k], loaded[k]) for k in loaded if loaded[k] != defaults[k]}
    assert differ == {  # only the synthetic preset's values and the derived sizes
        "encoder.random_fallback": (False, True),
        "crops.image_size": (None, [128, 128]),
        "crops.crop_size": (None, 64),
        "crops.batch_size": (64, 128),
        "pseudo.image_size": ([320, 320], [128, 128]),
        "train.image_size": (None, [128, 128]),
        "eval.image_size": (None, [128, 128]),
        "decoder.n_heads": (6, 2),
        "train.lr": (1e-4, 1e-3),
        "train.use_gpu": (True, None),  # the demo asks for what the cluster has: a laptop or a cluster alike
        "resources.actor_gpus": (1.0, None),
        "resources.cluster_gpu": (True, None),
    }


def test_sizes_derive_from_the_pseudo_label_size():
    cfg = Config()
    cfg.pseudo.image_size = (320, 640)
    derive_sizes(cfg)
    assert (cfg.crops.image_size, cfg.crops.crop_size, cfg.train.image_size, cfg.eval.image_size) == (
        (640, 1280),
        320,
        (320, 640),
        (320, 640),
    )
    cfg = load_config(preset="cocostuff27", overrides=["pseudo.image_size=[280, 280]", "train.image_size=[224, 224]"])
    assert (cfg.crops.image_size, cfg.crops.crop_size, cfg.train.image_size, cfg.eval.image_size) == (
        (560, 560),
        280,
        (224, 224),
        (224, 224),
    )


def test_a_wrong_choice_is_one_line_naming_key_and_choices(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["crops.prior=fg"])
    assert str(e.value) == "command line: key 'crops.prior' = 'fg': expected one of attention, none, all_fg"
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  best_by: acc\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"{f}: key 'train.best_by' = 'acc': expected one of miou_plus_acc, miou"


def test_every_layout_the_loader_accepts_has_a_reader():
    assert typing.get_args(typing.get_type_hints(DataConfig)["layout"]) == tuple(READERS)


# preset -> crops.image_size, crops.crop_size, pseudo/train/eval.image_size, (k_fg, k_bg), data.n_classes,
# background channel, prior, lr, batch size, epoch repeat, round epochs
PINNED = {
    "cocostuff27": [(640, 640), 320, (320, 320), (320, 320), (320, 320), (12, 15), 27, False, "attention", 1e-4, 256,
                    1, (2,) * 100],
    "cocostuff27_curated": [(640, 640), 320, (320, 320), (320, 320), (320, 320), (12, 15), 27, False, "attention",
                            2.2e-4, 256, 1, (1,) * 200],
    "voc": [(640, 640), 320, (320, 320), (320, 320), (320, 320), (20, 0), 21, True, "attention", 1e-4, 512, 20,
            (5,) * 8 + (4,) * 12 + (2, 3, 3, 3, 1)],
    "cityscapes27": [(640, 1280), 320, (320, 640), (320, 640), (320, 640), (27, 0), 27, False, "none", 5e-5, 256, 20,
                     (1,) * 50],
    "lip5": [(1280, 640), 320, (640, 320), (480, 240), (640, 320), (5, 0), 6, True, "all_fg", 1e-4, 512, 1,
             (2,) * 50],
    "lip16": [(1280, 640), 320, (640, 320), (480, 240), (640, 320), (16, 0), 17, True, "all_fg", 2e-5, 512, 1,
              (2,) * 50],
    "lip19": [(1280, 640), 320, (640, 320), (640, 320), (640, 320), (19, 0), 20, True, "all_fg", 2e-5, 256, 1,
              (3,) * 10 + (2,) * 35],
    "synthetic": [(128, 128), 64, (128, 128), (128, 128), (128, 128), (4, 4), 8, False, "attention", 1e-3, 16, 1,
                  (2, 2, 2)],
}  # fmt: skip


@pytest.mark.parametrize("preset", PINNED)
def test_preset_resolves_to_its_pinned_values(preset):
    c = load_config(preset=preset)
    assert [
        c.crops.image_size,
        c.crops.crop_size,
        c.pseudo.image_size,
        c.train.image_size,
        c.eval.image_size,
        (c.cluster.k_fg, c.cluster.k_bg),
        c.data.n_classes,
        c.loss.background_channel,
        c.crops.prior,
        c.train.lr,
        c.train.batch_size,
        c.train.epoch_repeat,
        c.train.round_epochs,
    ] == PINNED[preset]
