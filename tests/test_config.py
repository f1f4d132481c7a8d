"""Config presets, profiles, YAML and command-line overrides, and the messages for bad keys."""

import pytest

from transfgu_dist.config import ConfigError, dump_yaml, load_config


def test_preset_profile_and_overrides(tmp_path):
    cfg = load_config(preset="cocostuff27")
    assert (cfg.cluster.k_fg, cfg.cluster.k_bg, cfg.n_concepts, cfg.n_outputs) == (12, 15, 27, 27)
    assert cfg.profile == "reference" and cfg.pseudo.similarity == "cosine" and cfg.pseudo.loss_scale is None
    paper = load_config(preset="cocostuff27", profile="paper")
    assert paper.pseudo.similarity == "dot" and paper.decoder.mask_head == "scaled_dot" and paper.loss.alpha_step == 0
    voc = load_config(preset="voc", overrides=["loss.t_bg=0.2", "train.round_epochs=[1, 1]"])
    assert voc.n_outputs == 21 and voc.loss.t_bg == 0.2 and voc.train.round_epochs == (1, 1)
    assert voc.crops.betas == (0.6, 0.5, 0.4, 0.3)
    f = tmp_path / "run.yaml"
    f.write_text(dump_yaml(voc))
    again = load_config(f)
    assert again == voc


def test_bad_keys_are_named(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'train.learning_rate'"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"command line: key 'train.lr': expected float"):
        load_config(overrides=["train.lr=fast"])
    with pytest.raises(ConfigError, match="unknown preset 'coco'"):
        load_config(preset="coco")
    with pytest.raises(ConfigError, match=r"key 'decoder.mask_head' = 'dot'"):
        load_config(overrides=["decoder.mask_head=dot"])
    with pytest.raises(ConfigError, match=r"missing\.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_sizes_must_divide_by_the_encoder_patch():
    """Patch 14 (DINOv2): a 640 px size fails naming the key; 560/280 px (40x40 and 20x20 grids) pass."""
    with pytest.raises(
        ConfigError,
        match=r"key 'crops.image_size' = \(640, 640\): expected multiples of 14 "
        r"\(patch size 14 of encoder 'vit_small_patch14_reg4_dinov2'\)",
    ):
        load_config(overrides=["preset=cocostuff27", "encoder.arch=vit_small_patch14_reg4_dinov2"])
    sizes = [
        "crops.image_size=[560, 560]",
        "crops.crop_size=280",
        "pseudo.image_size=[560, 560]",
        "train.image_size=[560, 560]",
        "eval.image_size=[560, 560]",
    ]
    cfg = load_config(overrides=["preset=cocostuff27", "encoder.arch=vit_small_patch14_reg4_dinov2", *sizes])
    assert cfg.pseudo.image_size == (560, 560)
    with pytest.raises(ConfigError, match=r"key 'train.image_size' = \(546, 546\): expected multiples of 28"):
        load_config(
            overrides=["preset=cocostuff27", "encoder.arch=dinov2_tiny_test", *sizes, "train.image_size=[546, 546]"]
        )
    with pytest.raises(ConfigError, match="key 'encoder.arch' = 'vit_nope'"):
        load_config(overrides=["encoder.arch=vit_nope"])


@pytest.mark.parametrize("text", ["2e-4", "1e-4", "1.0e-4"])
def test_floats_in_any_notation(tmp_path, text):
    assert load_config(overrides=[f"train.lr={text}"]).train.lr == float(text)
    f = tmp_path / "lr.yaml"
    f.write_text(f"train:\n  lr: {text}\nloss:\n  t_bg: {text}\n")
    cfg = load_config(f)
    assert cfg.train.lr == cfg.loss.t_bg == float(text)


def test_yaml_syntax_error_names_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML .*line \d+"):
        load_config(f)
