"""Where the authors' code departs from the paper, pinned by the figures measured against that code."""

import math

import numpy as np
import pytest
import torch

from transfgu_dist.config import DecoderConfig, EncoderConfig, PseudoLabelConfig, load_config
from transfgu_dist.io import bank
from transfgu_dist.io.images import resize_labels, to_float_batch
from transfgu_dist.io.weights import build_encoder
from transfgu_dist.method.crops import sliding_windows, windows_to_boxes
from transfgu_dist.method.decoder import MaskTransformer
from transfgu_dist.method.gradcam import compose, gradcam_terms
from transfgu_dist.method.metrics import scores_from_confusion
from transfgu_dist.method.resizing import ANTIALIAS, Resizing, resize_crops, resizing
from transfgu_dist.method.targets import minmax

STARTS_640 = {
    0.5: [0, 160, 312],
    0.4: [0, 128, 256, 376],
    0.3: [0, 96, 192, 288, 384, 440],
    0.2: [0, 64, 128, 192, 256, 320, 384, 448, 504],
}
SIDES_640 = {0.5: 327, 0.4: 263, 0.3: 199, 0.2: 135}


def _pixel_starts(boxes, windows, i, col):
    return sorted(set(boxes[windows[:, 0] == i, col].tolist()))


def test_reference_windows_640_square():
    betas = (0.5, 0.4, 0.3, 0.2)
    win = sliding_windows(80, 80, betas, "reference")
    boxes = windows_to_boxes(win, 8, "reference")
    assert len(win) == len(sliding_windows(80, 80, betas, "paper")) == 142
    for i, beta in enumerate(betas):
        sel = boxes[win[:, 0] == i]
        assert set((sel[:, 2] - sel[:, 0]).tolist()) == set((sel[:, 3] - sel[:, 1]).tolist()) == {SIDES_640[beta]}
        assert _pixel_starts(boxes, win, i, 0) == _pixel_starts(boxes, win, i, 1) == STARTS_640[beta]
    assert boxes[:, 2:].max() == 639  # last window ends on the last pixel (exclusive 639 = (b+1)*8-1 past 312)


def test_paper_windows_640_unchanged():
    win = sliding_windows(80, 80, (0.5,), "paper")
    boxes = windows_to_boxes(win, 8, "paper")
    assert _pixel_starts(boxes, win, 0, 0) == [0, 160, 320] and set(boxes[:, 2] - boxes[:, 0]) == {320}


def test_reference_windows_non_square():
    # 640 x 1280 (Cityscapes), beta 0.5: b = 40 tokens, 41-token windows, rows 0, 20, 39, columns 0..100 by 20, 119
    win = sliding_windows(80, 160, (0.5,), "reference")
    boxes = windows_to_boxes(win, 8, "reference")
    assert _pixel_starts(boxes, win, 0, 1) == [0, 160, 312]
    assert _pixel_starts(boxes, win, 0, 0) == [0, 160, 320, 480, 640, 800, 952]
    assert len(win) == 21 and boxes[:, 2].max() == 1279 and set(boxes[:, 2] - boxes[:, 0]) == {327}


def test_unknown_window_rule_named():
    with pytest.raises(ValueError, match="crops.window_rule"):
        sliding_windows(8, 8, (0.5,), "exact")


def _decoder(k, eps, init="orthogonal", seed=0):
    torch.manual_seed(seed)
    return MaskTransformer(16, k, DecoderConfig(n_heads=2, dropout=0.0, block_eps=eps, class_init=init)).eval()


def test_block_eps_reaches_every_block_norm():
    dec = _decoder(5, 1e-5)
    eps = {m.eps for b in dec.blocks for m in (b.norm1, b.norm2)}
    assert eps == {1e-5}
    assert {m.eps for b in _decoder(5, 1e-6).blocks for m in (b.norm1, b.norm2)} == {1e-6}


@pytest.mark.parametrize("k", [27, 171])
def test_orthogonal_class_init_norm(k):
    emb = _decoder(k, 1e-5).cls_emb.detach()
    # orthogonal_ on a (1, K, d) tensor: a single unit vector of length K*d, so rows have norm ~ 1/sqrt(K)
    assert emb.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert emb.norm(dim=-1).mean().item() == pytest.approx(1 / math.sqrt(k), rel=0.15)
    assert _decoder(k, 1e-5, "trunc_normal").cls_emb.std().item() == pytest.approx(0.02, rel=0.2)


def test_eps_changes_logits_with_small_class_embeddings():
    a, b = _decoder(27, 1e-5), _decoder(27, 1e-6)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 4, 16)
    la, lb = a(x).logits, b(x).logits
    assert not torch.equal(la, lb)
    b2 = _decoder(27, 1e-5, seed=1)
    b2.load_state_dict(a.state_dict())
    torch.testing.assert_close(b2(x).logits, la)


def _cfg(preset, profile="reference"):
    return load_config(preset=preset, profile=profile)


def test_schedules_follow_reference():
    for preset in ("cocostuff171", "coco80"):
        assert _cfg(preset).train.round_epochs == (3,) * 10 + (2,) * 85
    voc = _cfg("voc").train.round_epochs
    assert voc == (5,) * 8 + (4,) * 12 + (2,) + (3,) * 3 + (1,) and sum(voc) == 100
    assert _cfg("lip19").train.round_epochs == (3,) * 10 + (2,) * 35
    assert _cfg("cocostuff27").train.round_epochs == (2,) * 100


def test_epoch_repeat_per_preset():
    assert {p: _cfg(p).train.epoch_repeat for p in ("voc", "cityscapes27", "cocostuff27", "lip5", "synthetic")} == {
        "voc": 20,
        "cityscapes27": 20,
        "cocostuff27": 1,
        "lip5": 1,
        "synthetic": 1,
    }


def test_profiles_set_window_rule_and_decoder():
    ref, paper = _cfg("synthetic"), _cfg("synthetic", "paper")
    assert (ref.crops.window_rule, ref.decoder.block_eps, ref.decoder.class_init) == ("reference", 1e-5, "orthogonal")
    assert (paper.crops.window_rule, paper.decoder.block_eps, paper.decoder.class_init) == (
        "paper",
        1e-6,
        "trunc_normal",
    )


def test_best_checkpoint_score():
    from transfgu_dist.method.bootstrapping import selection_score

    m = {"val/miou": 0.25, "val/pixel_accuracy": 0.5}
    assert selection_score(m, "miou_plus_acc") == 0.75 and selection_score(m, "miou") == 0.25
    # epoch A (mIoU 0.30, acc 0.40) loses to epoch B (0.28, 0.50) under the reference rule only
    a, b = {"val/miou": 0.30, "val/pixel_accuracy": 0.40}, {"val/miou": 0.28, "val/pixel_accuracy": 0.50}
    assert selection_score(b, "miou_plus_acc") > selection_score(a, "miou_plus_acc")
    assert selection_score(b, "miou") < selection_score(a, "miou")


@pytest.mark.parametrize(
    "skip,sign,stepped", [(True, -1.0, False), (True, 0.0, False), (True, 1.0, True), (False, -1.0, True)]
)
def test_optimizer_step_skipped_for_nonpositive_loss(skip, sign, stepped):
    from transfgu_dist.method.bootstrapping import optimizer_step

    cfg = load_config(preset="synthetic")
    cfg.train.skip_nonpositive_loss = skip
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    loss = sign * model(torch.ones(1, 2)).sum().abs() if sign else model.weight.sum() * 0.0
    assert optimizer_step(opt, model, loss, cfg) is stepped
    assert torch.equal(model.weight, before) is (not stepped or sign == 0.0)


def test_reference_profile_training_details():
    ref, paper = _cfg("synthetic").train, _cfg("synthetic", "paper").train
    assert (ref.best_by, ref.skip_nonpositive_loss, ref.per_batch_augment) == ("miou_plus_acc", True, True)
    assert (paper.best_by, paper.skip_nonpositive_loss, paper.per_batch_augment) == ("miou", False, False)


def _fp16_maps(maps):
    """The bank's old stored form: the summed maps rounded to fp16."""
    return maps.half().float()


def _bank_round_trip(shared, terms, dtype="float16"):
    s, t, scale = (torch.from_numpy(a) for a in bank.encode(shared, terms, dtype))
    return bank.decode(s.view_as(shared), t.view_as(terms), scale)


def test_bank_hand_worked_pixel():
    """One pixel, shared term 0.75, concept terms 1.0e-4 and 1.2e-4: fp16's step at 0.75 is 2^-11 = 4.9e-4, so both
    maps round to 0.75 and the tie picks concept 0; stored apart the terms keep their order (concept 1)."""
    shared = torch.full((1, 1, 1), 0.75)
    terms = torch.tensor([1.0e-4, 1.2e-4, float("nan")]).view(1, 3, 1, 1)  # concept 2 zeroed (positive gradient)
    maps = compose(shared, terms)
    assert maps.flatten().tolist() == pytest.approx([0.7501, 0.75012, 0.0], abs=1e-7)
    assert _fp16_maps(maps).flatten().tolist() == [0.75, 0.75, 0.0] and _fp16_maps(maps).argmax(1).item() == 0
    back = _bank_round_trip(shared, terms)
    assert back.argmax(1).item() == 1 and back[0, 2, 0, 0].item() == 0.0
    assert (back - maps).abs().max().item() < 1.2e-4 * 2**-11
    s, t, scale = bank.encode(shared, terms, "float16")  # scale: the power of two above the largest term, 2^-13
    assert scale.tolist() == [2.0**-13] and s.dtype == np.float32 and t.dtype == np.float16


@pytest.mark.parametrize("k", [27, 171])
def test_bank_keeps_fp32_labels_and_soft_targets(k):
    """Maps with the reference's structure (A/max(A) shared, per-concept terms of median ~1.3e-4, ~40% zeroed, as
    measured on ViT-S/8): the stored form agrees with fp32 on >= 99.9% of the argmax and within 1e-3 on min-max
    soft targets; the old fp16 maps fail the argmax bound by far."""
    g = torch.Generator().manual_seed(k)
    attn = torch.rand(2, 20, 20, generator=g)
    shared = attn / attn.amax(dim=(1, 2), keepdim=True)
    terms = 1.3e-4 * torch.exp(0.7 * torch.randn(2, k, 20, 20, generator=g))
    terms = terms.masked_fill(torch.rand(2, k, 20, 20, generator=g) < 0.2, 0.0)  # outside the top mass
    terms = terms.masked_fill(torch.rand(2, k, 20, 20, generator=g) < 0.4, float("nan"))  # positive gradient
    ref = compose(shared, terms)

    def agreement(m):
        return (m.argmax(1) == ref.argmax(1)).float().mean().item()

    new = _bank_round_trip(shared, terms)
    assert agreement(new) >= 0.999 and (minmax(new) - minmax(ref)).abs().max().item() <= 1e-3
    assert agreement(_fp16_maps(ref)) < 0.9  # 60% / 62% at K = 27 / 171
    assert bank.bytes_per_image(k, 20, 20, "float16") <= 1.1 * 2 * k * 20 * 20  # about the fp16 size
    assert bank.bytes_per_image(k, 20, 20) == 4 * k * 20 * 20 + 4 * 20 * 20 + 4  # fp32 terms: the authors' 4 B


def test_gradcam_loss_scale_is_one_over_batch_length():
    """pseudo.loss_scale None (reference, the authors' batch-mean loss): every Grad-CAM batch, a final partial one
    too, scales its loss by 1/len(batch), so a 3-image batch equals scale 1/3 and its 1-image remainder scale 1."""
    encoder = build_encoder(EncoderConfig(arch="vit_tiny_test", weights="random"))
    images, concepts = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.randn(5, 48)

    def terms(x, scale):
        return gradcam_terms(encoder, x, concepts, PseudoLabelConfig(loss_scale=scale))[1].nan_to_num(-1)

    for chunk, fixed in ((images[:3], 1 / 3), (images[3:], 1.0)):
        assert torch.allclose(terms(chunk, None), terms(chunk, fixed), atol=1e-7)
    assert not torch.allclose(terms(images[:3], None), terms(images[:3], 1.0), atol=1e-7)
    assert _cfg("cocostuff27").pseudo.loss_scale is None and _cfg("cocostuff27", "paper").pseudo.loss_scale == 1.0
    assert _cfg("cityscapes27").pseudo.batch_size == _cfg("lip19").pseudo.batch_size == 2  # the authors' N


def test_reference_resize_methods_per_profile():
    """reference: COCO full images nearest (OpenCV), other layouts plain bilinear; crops plain bilinear; labels
    `nearest`. paper keeps antialiased bilinear, RoI-Align crops and `nearest-exact` labels."""
    assert resizing(_cfg("cocostuff27").data) == Resizing("nearest", "bilinear", "bilinear", "nearest")
    assert resizing(_cfg("voc").data) == Resizing("bilinear", "bilinear", "bilinear", "nearest")
    assert (
        resizing(_cfg("cocostuff27", "paper").data)
        == ANTIALIAS
        == Resizing("antialias", "antialias", "roi_align", "nearest-exact")
    )


def test_resize_methods_hand_worked():
    """3 -> 5 px: OpenCV nearest takes floor(d * 3/5) = 0,0,1,1,2, nearest-exact floor((d + .5) * 3/5) = 0,0,1,2,2.
    4 -> 2 px of 0,1,2,3: plain bilinear samples 0.5 and 2.5; antialiased averages (the first is 1.25/1.75)."""
    row = np.array([[[0, 0, 0], [100, 100, 100], [200, 200, 200]]], np.uint8)  # (1, 3, 3): one row of 3 px
    near = to_float_batch(row, (1, 5), "nearest")[0, 0, 0].mul(255).round().tolist()
    assert near == [0, 0, 100, 100, 200]
    labels = torch.tensor([[0, 1, 2]])
    assert resize_labels(labels, (1, 5), "nearest").tolist() == [[0, 0, 1, 1, 2]]
    assert resize_labels(labels, (1, 5)).tolist() == [[0, 0, 1, 2, 2]]  # nearest-exact (paper profile)
    ramp = np.repeat(np.array([[0, 51, 102, 153]], np.uint8)[..., None], 3, axis=2)  # values 0, 1, 2, 3 (x 51)
    plain = to_float_batch(ramp, (1, 2), "bilinear")[0, 0, 0].mul(255 / 51).tolist()
    assert plain == pytest.approx([0.5, 2.5], abs=1e-5)
    assert to_float_batch(ramp, (1, 2))[0, 0, 0, 0].mul(255 / 51).item() == pytest.approx(1.25 / 1.75, abs=1e-5)


def test_plain_crop_resize_hand_worked():
    """A 3-px-wide box resized to 2 px: plain bilinear samples x = (d + .5) * 1.5 - .5 = 0.25, 1.75; RoI-Align
    averages two samples a bin (-0.125 -> 0 clamped, 0.625) = 0.3125 for the first. Boxes are rounded to pixels."""
    image = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 2, 4).contiguous()  # value = column
    roi = torch.tensor([[0, 0.2, 0, 3.2, 2]])
    assert resize_crops(image, roi, (2, 2), "bilinear")[0, 0, 0].tolist() == pytest.approx([0.25, 1.75])
    assert resize_crops(image, roi.round(), (2, 2), "roi_align")[0, 0, 0, 0].item() == pytest.approx(0.3125)
    two = torch.tensor([[0, 0, 0, 3, 2], [0, 1, 0, 4, 2], [0, 0, 0, 2, 2]], dtype=torch.float32)  # 2 sizes
    out = resize_crops(image, two, (2, 2), "bilinear")
    assert out[1, 0, 0].tolist() == pytest.approx([1.25, 2.75]) and out[2, 0, 0].tolist() == pytest.approx([0.0, 1.0])


def test_table3_scores_the_bank_argmax(tmp_path):
    """Two 4x4 training images, GT left half class 0 / right half class 1; the 2x2-grid bank puts concept 1 on
    the left and concept 0 on the right (terms 2e-4 vs 1e-4 on a shared A): conf[gt, pseudo] = [[0, 64], [64, 0]]
    over both images (GT and labels at 8x8), which Hungarian matching scores as mIoU 1. An image without GT
    is left out."""
    from PIL import Image

    from transfgu_dist.pipeline.table3 import bank_confusion

    gt = np.repeat(np.array([[0, 0, 1, 1]], np.uint8), 4, axis=0)
    for i in ("a", "b"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / f"{i}.png")
        Image.fromarray(gt).save(tmp_path / f"{i}_gt.png")
    terms = torch.tensor([[[1e-4, 2e-4], [1e-4, 2e-4]], [[2e-4, 1e-4], [2e-4, 1e-4]]])  # (K, h, w)
    terms = torch.stack([terms, terms, terms])  # images a, b, c (c has no GT)
    s, t, scale = bank.encode(torch.full((3, 2, 2), 0.5), terms)
    batch = {
        "image_id": np.array(["a", "b", "c"]),
        "path": np.array([f"{i}.png" for i in "abc"]),  # relative to data.root
        "grid": np.array([[2, 2]] * 3),
        "shared": s,
        "terms": t,
        "scale": scale,
        "fg_prior": np.ones((3, 4), bool),
    }
    keys = ["eval.image_size=[8, 8]", "data.n_classes=2", "cluster.k_fg=1", "cluster.k_bg=1", f"data.root={tmp_path}"]
    cfg = load_config(overrides=keys)
    labels = {i: str(tmp_path / f"{i}_gt.png") for i in "ab"}
    conf = bank_confusion(batch, cfg, None, labels)["confusion"][0]
    assert conf.tolist() == [[0, 64], [64, 0]]
    assert scores_from_confusion(conf).miou == 1.0


def test_old_bank_part_named(tmp_path):
    """A part in the old summed-fp16 form fails in one line naming the file and the expected columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transfgu_dist.io.parts import fixed_list

    old = tmp_path / "part-old.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "maps": fixed_list(np.ones((1, 4), np.float16), pa.float16())}), old)
    with pytest.raises(
        ValueError,
        match=r"part-old.parquet: expected the pseudo-label bank columns path, shared, terms, "
        r"scale, got image_id, maps \(a bank from an older version: rerun pseudo_label\)",
    ):
        bank.check_part(str(old))
    new = tmp_path / "part-new.parquet"
    pq.write_table(pa.table({"path": ["a.png"], **bank.columns(torch.ones(1, 2, 2), torch.zeros(1, 3, 2, 2))}), new)
    bank.check_part(str(new))
