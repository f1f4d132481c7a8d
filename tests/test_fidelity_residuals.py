"""The last fidelity residuals measured against the authors' code: precision, bank terms at near-ties, the fg
fraction's pixel crop, odd window sides, float resizing, LIP's eval size, crop offsets and the best score."""

import numpy as np
import pytest
import torch

from transfgu_dist.config import ConfigError, load_config, to_dict
from transfgu_dist.io import bank
from transfgu_dist.io.image_pool import images_to_device, load_images
from transfgu_dist.method.augment import AugmentConfig, crop_and_flip
from transfgu_dist.method.bootstrapping import INITIAL_BEST_SCORE
from transfgu_dist.method.crops import (
    DROP,
    FG,
    classify_windows,
    fg_fraction,
    sliding_windows,
    windows_to_boxes,
)
from transfgu_dist.method.gradcam import compose
from transfgu_dist.method.precision import autocast
from transfgu_dist.pipeline import contract

USES = ("crops", "pseudo", "train", "eval")


def test_precision_defaults_to_the_authors_fp32_and_is_checked():
    cfg = load_config()
    assert {getattr(cfg, u).precision for u in USES} == {"fp32"}
    assert load_config(overrides=["pseudo.precision=bf16"]).pseudo.precision == "bf16"
    with pytest.raises(ConfigError, match=r"key 'eval.precision' = 'fp16': expected one of fp32, tf32, bf16"):
        load_config(overrides=["eval.precision=fp16"])


def test_bf16_rounds_where_fp32_does_not():
    """1 + 2^-10 needs 11 significant bits: fp32 keeps it, bf16 (8 bits) rounds the matmul result to 1."""
    a, b = torch.full((1, 1), 1 + 2**-10), torch.ones(1, 1)
    cpu = torch.device("cpu")
    for precision, expected in (("fp32", 1 + 2**-10), ("tf32", 1 + 2**-10), ("bf16", 1.0)):
        with autocast(cpu, precision):
            assert (a @ b).float().item() == expected
    with pytest.raises(ValueError, match="unknown precision 'fp16'"), autocast(cpu, "fp16"):
        pass


def test_settings_guard_covers_every_new_key():
    """Each key that changes an output is an input of the stage that writes it (resumes with another value are
    refused): precision per use, the bank's terms dtype, and validation's precision for best.pt."""
    values = to_dict(load_config())
    expected = {
        "extract": ("crops.precision",),
        "pseudo_label": ("pseudo.precision", "pseudo.terms_dtype"),
        "bootstrap": ("train.precision", "eval.precision"),
        "evaluate": ("eval.precision",),
    }
    for stage, keys in expected.items():
        assert set(keys) <= contract.input_values(values, stage).keys(), stage


def test_bank_fp32_terms_keep_a_near_tie_that_fp16_terms_flip():
    """Pixel 0: shared 0.75, concept terms 0.3125 * 2^-9 and 1.7e-7 more (the median top-two gap of the flipped
    pixels); pixel 1's term 1e-3 sets the scale 2^-9, so the scaled terms are 0.3125 and 0.3125 + 8.7e-5, below half
    an fp16 step there (2^-12 = 2.4e-4 / 2): fp16 terms tie (argmax 0); fp32 terms keep concept 1, as the authors'
    fp32 maps do (the gap is ~3 fp32 steps at 0.75)."""
    t0 = 0.3125 * 2.0**-9
    shared = torch.full((1, 1, 2), 0.75)
    terms = torch.tensor([[t0, 1e-3], [t0 + 1.7e-7, 0.0]]).view(1, 2, 1, 2)
    assert compose(shared, terms).argmax(1)[0, 0, 0].item() == 1

    def stored(dtype):
        s, t, scale = (torch.from_numpy(a) for a in bank.encode(shared, terms, dtype))
        assert scale.tolist() == [2.0**-9]
        return bank.decode(s.view_as(shared), t.float().view_as(terms), scale).argmax(1)[0, 0, 0].item()

    assert (stored("float16"), stored("float32")) == (0, 1)


def test_bank_of_other_terms_dtype_fails_in_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    old = tmp_path / "part-old.parquet"
    columns = bank.columns(torch.ones(1, 2, 2), torch.zeros(1, 3, 2, 2), "float16")
    pq.write_table(pa.table({"path": ["a.png"], **columns}), old)
    with pytest.raises(ValueError, match=r"part-old.parquet: expected bank terms of float32 \(pseudo.terms_dtype\), "):
        bank.check_part(str(old))
    bank.check_part(str(old), "float16")


def test_reference_fg_fraction_is_the_pixel_crop_hand_worked():
    """A 2 x 2-token reference window (p = 8: a 15 x 15 px crop) whose top row is foreground: 2 of 4 tokens (0.5,
    not above fg_min: dropped) but 8 x 15 = 120 of 225 pixels (0.533: a fg crop) in the authors' pixel crop."""
    fg = torch.tensor([[True, True], [False, False]])
    window = np.array([[0, 0, 0, 2]])
    assert fg_fraction(fg, window).tolist() == [0.5]
    assert fg_fraction(fg, window, "reference", 8).tolist() == pytest.approx([120 / 225])
    assert classify_windows(fg, window, "attention").tolist() == [DROP]
    assert classify_windows(fg, window, "attention", rule="reference", patch_size=8).tolist() == [FG]


def test_reference_fg_fraction_equals_the_upsampled_mask_crop():
    """The authors' rule in words: upsample the token mask (nearest) to pixels and average it over the window's
    pixel box [y0:y1, x0:x1]; on random masks over all 142 windows of an 80 x 80 grid."""
    g = torch.Generator().manual_seed(0)
    fg = torch.rand(80, 80, generator=g) > 0.5
    windows = sliding_windows(80, 80, (0.5, 0.4, 0.3, 0.2), "reference")
    pixels = np.kron(fg.numpy(), np.ones((8, 8))).astype(np.float64)
    expected = [pixels[y0:y1, x0:x1].mean() for x0, y0, x1, y1 in windows_to_boxes(windows, 8, "reference")]
    np.testing.assert_allclose(fg_fraction(fg, windows, "reference", 8), expected, rtol=1e-6)


def test_odd_window_sides_follow_the_authors_rule_600x800():
    """600 x 800 (75 x 100 tokens): b = 37 and 15 are odd; the authors' centre rule gives 98 windows, sides 295 and
    119 px (b tokens), where b+1-token windows gave 222 (303 / 127 px); the presets' even sides are unchanged."""
    betas = (0.5, 0.4, 0.3, 0.2)
    windows = sliding_windows(75, 100, betas, "reference")
    boxes = windows_to_boxes(windows, 8, "reference")
    sides = {betas[i]: set((boxes[windows[:, 0] == i, 2] - boxes[windows[:, 0] == i, 0]).tolist()) for i in range(4)}
    assert len(windows) == 98 and sides == {0.5: {295}, 0.4: {247}, 0.3: {183}, 0.2: {119}}
    assert (windows[:, 0] == 0).sum() == 2 and (windows[:, 0] == 3).sum() == 24
    assert len(sliding_windows(80, 80, betas, "reference")) == 142


def test_bilinear_resized_images_stay_float(tmp_path):
    """A row 0, 255 resized to 4 pixels (bilinear, align_corners False): 0, 63.75, 191.25, 255 of 255, kept in float
    (rounded to uint8 they were 0.5/255 off); COCO's nearest resize stays exact in uint8."""
    from PIL import Image

    Image.fromarray(np.array([[[0] * 3, [255] * 3]], np.uint8)).save(tmp_path / "a.png")
    batch = {"image_id": np.array(["a"]), "uri": np.array([str(tmp_path / "a.png")])}
    bilinear = load_images(batch, (1, 4), "bilinear")["image"]
    assert bilinear.dtype == np.float32 and bilinear[0, 0, :, 0].tolist() == [0.0, 0.25, 0.75, 1.0]
    nearest = load_images(batch, (1, 4), "nearest")
    assert nearest["image"].dtype == np.uint8 and nearest["image"][0, 0, :, 0].tolist() == [0, 0, 255, 255]
    assert images_to_device(nearest, torch.device("cpu"))[0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("preset", ["lip5", "lip16", "lip19"])
def test_lip_evaluates_at_640x320(preset):
    cfg = load_config(preset=preset)
    assert cfg.eval.image_size == (640, 320)
    assert cfg.train.image_size == ((640, 320) if preset == "lip19" else (480, 240))


def test_reference_crop_offsets_are_floored():
    """A 4 x 4 crop at (x, y) = (2.6, 1.7) of an 8 x 8 image: the authors draw integer offsets 0..avail-1, i.e. the
    floor, so the crop starts at column 2 and row 1 (rounding started it at 3 and 2)."""
    image = torch.arange(64.0).view(1, 1, 8, 8).expand(1, 3, 8, 8).contiguous()
    labels = torch.zeros(1, 1, 8, 8)
    box = torch.tensor([[2.6, 1.7, 6.6, 5.7]])
    no_flip = AugmentConfig(crop_resize="bilinear", flip_p=0.0)
    out, _ = crop_and_flip(image, labels, box, (4, 4), (4, 4), no_flip, torch.Generator())
    assert torch.equal(out[0, 0], image[0, 0, 1:5, 2:6])


def test_best_checkpoint_score_starts_at_zero():
    """The authors' best score starts at 0: an epoch scoring 0 (mIoU + accuracy) is never kept as the best."""
    assert INITIAL_BEST_SCORE == 0.0


def test_reference_drops_the_last_partial_batch():
    """The authors' loader drops each epoch's last partial batch; the paper profile keeps it."""
    assert load_config().train.drop_last and not load_config(profile="paper").train.drop_last


def test_epoch_shuffle_seed_is_keyed_on_seed_and_epoch_only():
    """Each epoch's global reshuffle is seeded by (train.seed, epoch) alone: a resumed run draws the same orders."""
    from transfgu_dist.pipeline.training_data import epoch_seed

    cfg, other = load_config(), load_config(overrides=["train.seed=7"])
    seeds = [epoch_seed(cfg, e) for e in range(4)]
    assert seeds == [epoch_seed(load_config(), e) for e in range(4)] and len(set(seeds)) == 4
    assert epoch_seed(other, 0) not in seeds and cfg.train.shuffle == "global"
