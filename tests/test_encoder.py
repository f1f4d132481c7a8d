"""The encoder matches timm's own forward, loads DINO-format checkpoints, and batched Grad-CAM equals a K-loop."""

import math

import pytest
import torch

from transfgu_dist.config import EncoderConfig, PseudoLabelConfig
from transfgu_dist.io.weights import EncoderLoadError, build_encoder, load_dino_weights, resolve_encoder
from transfgu_dist.method.encoder import ViTEncoder, dino_pos_embed
from transfgu_dist.method.gradcam import attention_gradients, concept_similarity, gradcam


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(EncoderConfig(arch="vit_tiny_test", weights="random"))


def timm_last_attention(vit, x):
    """CLS row of the last block's attention from timm's unfused path (captured by a hook)."""
    last = vit.blocks[-1].attn
    seen = {}
    last.fused_attn = False
    handle = last.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    try:
        vit.forward_features(x)
    finally:
        handle.remove()
        last.fused_attn = True
    return seen["a"][:, :, 0]


FAMILIES = ["vit_tiny_test", "dinov2_tiny_test", "dinov2_reg4_tiny_test", "dinov3_tiny_test"]


def perturbed(arch):
    """A tiny encoder whose LayerScale gammas and biases (constant at init) are random, so that they count."""
    enc = build_encoder(EncoderConfig(arch=arch, weights="random"))
    gen = torch.Generator().manual_seed(1)
    for name, p in enc.vit.named_parameters():
        if "gamma" in name or "bias" in name or "reg_token" in name:
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return enc


def timm_blocks(encoder, x):
    """timm's own blocks and final norm over the encoder's input tokens."""
    tokens, rope = encoder.tokens(x)
    for blk in encoder.vit.blocks:
        tokens = blk(tokens) if rope is None else blk(tokens, rope=rope)
    return encoder.vit.norm(tokens)


@pytest.mark.parametrize("arch", FAMILIES)
def test_hand_run_last_block_matches_timm(arch):
    """CLS, patch tokens and A_L^cls equal timm's forward (pins registers, LayerScale, RoPE, the prefix count)."""
    enc = perturbed(arch)
    p, npt = enc.patch_size, enc.n_prefix
    assert npt == (5 if "reg4" in arch or "dinov3" in arch else 1)
    x = torch.randn(2, 3, 6 * p, 9 * p)  # not the table's size: interpolated (DINO v1: DINO's rule, see below)
    out = enc(x)
    ref = timm_blocks(enc, x) if enc.offset_table else enc.vit.forward_features(x)
    assert out.grid == (6, 9) and out.patch.shape == (2, 6, 9, 48)
    assert torch.allclose(out.cls, ref[:, 0], atol=1e-5)
    assert torch.allclose(out.patch.flatten(1, 2), ref[:, npt:], atol=1e-5)
    if not enc.offset_table:  # (timm's forward resamples DINO v1's and DINOv2's table differently: see below)
        assert torch.allclose(out.cls_attn, timm_last_attention(enc.vit, x), atol=1e-6)
    assert out.attn.shape == (2, 6, 9)
    assert torch.allclose(out.attn.sum((1, 2)) + out.cls_attn[:, :, :npt].sum(2).mean(1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match=f"not divisible by the patch size {p}"):
        enc(torch.randn(1, 3, 6 * p + 2, 6 * p))


def test_dino_v1_at_224_is_timm_forward(encoder):
    x = torch.randn(1, 3, 224, 224)
    out, ref = encoder(x), encoder.vit.forward_features(x)
    assert torch.allclose(out.cls, ref[:, 0], atol=1e-5) and torch.allclose(
        out.patch.flatten(1, 2), ref[:, 1:], atol=1e-5
    )
    assert torch.allclose(out.cls_attn, timm_last_attention(encoder.vit, x), atol=1e-6)


@pytest.mark.parametrize("arch", ["dinov2_tiny_test", "dinov2_reg4_tiny_test"])
def test_dinov2_position_table_follows_the_official_rule(arch):
    """DINOv2's own interpolate_pos_encoding: without registers the hub uses offset 0.1, no antialias (DINO's rule,
    which timm's antialiased size= resample is not); with registers offset 0 and antialias, i.e. timm's resample.
    At the table's 37 x 37 grid (518 px) both use the table as is."""
    import torch.nn.functional as F

    enc = build_encoder(EncoderConfig(arch=arch, weights="random"))
    vit, n = enc.vit, 37
    patches = vit.pos_embed[:, -n * n :].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = (40, 20)
    if enc.n_prefix == 1:
        official = F.interpolate(
            patches, scale_factor=((40 + 0.1) / n, (20 + 0.1) / n), mode="bicubic", antialias=False
        )
    else:
        official = F.interpolate(patches, size=grid, mode="bicubic", antialias=True)
    x = torch.zeros(1, 3, 40 * 14, 20 * 14)
    tokens = enc.tokens(x)[0]
    embedded = vit.patch_embed(x).flatten(1, 2)
    assert torch.allclose(tokens[:, enc.n_prefix :] - embedded, official.flatten(2).transpose(1, 2), atol=1e-6)
    assert enc.offset_table == (enc.n_prefix == 1)
    same = torch.zeros(1, 3, 518, 518)
    assert torch.allclose(
        enc.tokens(same)[0][:, enc.n_prefix :] - vit.patch_embed(same).flatten(1, 2),
        vit.pos_embed[:, -n * n :],
        atol=1e-6,
    )


def bicubic_1d(x, scale, out_len):
    """Plain bicubic (Keys, a = -0.75, border-clamped) along dim 0: src = (i + 0.5)/scale - 0.5."""

    def w(t):
        t = abs(t)
        return (1.25 * t - 2.25) * t * t + 1 if t <= 1 else ((-0.75 * t + 3.75) * t - 6) * t + 3 if t < 2 else 0.0

    rows = []
    for i in range(out_len):
        src = (i + 0.5) / scale - 0.5
        f = math.floor(src)
        rows.append(sum(w(src - j) * x[min(max(j, 0), len(x) - 1)] for j in range(f - 1, f + 3)))
    return torch.stack(rows)


def test_dino_position_table_rule():
    """DINO's rule on a 3 x 3 table to a 5 x 4 grid, recomputed independently; 224 (the table's grid) as is."""
    torch.manual_seed(0)
    table = torch.randn(1, 10, 2, dtype=torch.float64)
    out = dino_pos_embed(table, (5, 4))
    grid = table[0, 1:].reshape(3, 3, 2)
    expect = bicubic_1d(bicubic_1d(grid, 5.1 / 3, 5).transpose(0, 1), 4.1 / 3, 4).transpose(0, 1)
    assert out.shape == (1, 21, 2) and torch.equal(out[0, 0], table[0, 0])
    assert torch.allclose(out[0, 1:].reshape(5, 4, 2), expect, atol=1e-12)
    # hand-worked: table rows (0, 0, 3), 5 output rows: row 2 samples src = 2.5 / (5.1/3) - 0.5 = 0.970588; only
    # input row 2 (distance 1.029412) is non-zero: 3 * (((-0.75 t + 3.75) t - 6) t + 3) = 3 * -0.020781
    rows = torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64).repeat_interleave(3)
    out = dino_pos_embed(torch.cat([torch.zeros(1), rows])[None, :, None], (5, 4))[0, 1:, 0].reshape(5, 4)
    assert torch.allclose(out[2], torch.full((4,), -0.062343, dtype=torch.float64), atol=1e-5)
    # the scale factor (not the output size) maps coordinates: size=(5, 4) gives other values
    by_size = torch.nn.functional.interpolate(grid.permute(2, 0, 1)[None], size=(5, 4), mode="bicubic")
    assert not torch.allclose(by_size[0].permute(1, 2, 0), expect, atol=1e-3)
    table28 = torch.randn(1, 1 + 28 * 28, 4)
    assert dino_pos_embed(table28, (28, 28)) is table28


def test_encoder_is_frozen(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training


def test_dino_checkpoint_roundtrip(tmp_path, encoder):
    other = ViTEncoder("vit_tiny_test")  # differently initialised
    path = tmp_path / "dino_tiny_pretrain.pth"
    torch.save(other.vit.state_dict(), path)
    load_dino_weights(encoder_copy := ViTEncoder("vit_tiny_test"), str(path))
    for k, v in other.vit.state_dict().items():
        assert torch.equal(encoder_copy.vit.state_dict()[k], v)
    # the full DINO training checkpoint format: {'teacher': {'backbone.*': ...}}
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in other.vit.state_dict().items()}}, wrapped)
    cfg = EncoderConfig(arch="vit_tiny_test", weights=str(wrapped))
    assert torch.equal(build_encoder(cfg).vit.pos_embed, other.vit.pos_embed)


def test_wrong_checkpoint_names_the_file(tmp_path):
    state = ViTEncoder("vit_tiny_test").vit.state_dict()
    del state["norm.weight"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(EncoderLoadError, match=r"bad\.pth.*missing keys: norm\.weight"):
        load_dino_weights(ViTEncoder("vit_tiny_test"), str(bad))
    with pytest.raises(EncoderLoadError, match=r"small\.pth.*shape mismatch"):
        torch.save(ViTEncoder("vit_tiny_test").vit.state_dict(), tmp_path / "small.pth")
        cfg = EncoderConfig(arch="vit_small_patch8", weights=str(tmp_path / "small.pth"))
        build_encoder(cfg)
    with pytest.raises(EncoderLoadError, match=r"nowhere\.pth: encoder checkpoint not found"):
        build_encoder(EncoderConfig(arch="vit_tiny_test", weights=str(tmp_path / "nowhere.pth")))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderLoadError, match="garbage.pth: not a readable PyTorch checkpoint"):
        build_encoder(EncoderConfig(arch="vit_tiny_test", weights=str(garbage)))


def test_fallback_only_for_the_default_weights(tmp_path, caplog):
    # vit_tiny_test has no timm weights: the default source fails at once, and falls back in one warning line
    resolved = resolve_encoder(EncoderConfig(arch="vit_tiny_test", weights="timm", random_fallback=True))
    assert resolved.arch == "vit_tiny_test" and resolved.weights == "random"
    assert "RANDOM ENCODER (vit_tiny_test): encoder 'vit_tiny_test' has no pretrained DINO weights" in caplog.text
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(EncoderLoadError, match="missing.pth: encoder checkpoint not found"):  # explicit: no fallback
        resolve_encoder(EncoderConfig(arch="vit_small_patch8", weights=missing, random_fallback=True))
    with pytest.raises(EncoderLoadError):
        resolve_encoder(EncoderConfig(arch="vit_small_patch8", weights=missing))


@pytest.mark.parametrize(
    "arch,kind,scale",
    [("vit_tiny_test", "dot", 1.0), ("vit_tiny_test", "cosine", 0.125), *((a, "cosine", 0.125) for a in FAMILIES[1:])],
)
def test_batched_gradcam_equals_k_backward_loop(arch, kind, scale):
    encoder = perturbed(arch)
    torch.manual_seed(0)
    images, concepts = torch.randn(3, 3, 4 * encoder.patch_size, 5 * encoder.patch_size), torch.randn(5, 48)
    batched = attention_gradients(encoder(images, with_patch=False, attn_grad=True), concepts, kind, scale)
    loop = []
    for k in range(concepts.shape[0]):
        out = encoder(images, with_patch=False, attn_grad=True)
        loss = scale * (1 - concept_similarity(out.cls, concepts, kind)[:, k]).sum()
        (g,) = torch.autograd.grad(loss, out.cls_attn)
        loop.append(g[..., out.n_prefix :].mean(1).unflatten(1, out.grid))
    assert batched.shape == (3, 5, 4, 5)
    assert torch.allclose(batched, torch.stack(loop, dim=1), atol=1e-5)
    maps, attn = gradcam(encoder, images, concepts, PseudoLabelConfig(similarity=kind, loss_scale=scale))
    assert maps.shape == (3, 5, 4, 5) and attn.shape == (3, 4, 5) and not maps.requires_grad


def official_format(arch, state):
    """A timm state dict written back in the official release's key format (the inverse of timm's filters)."""
    state, d = dict(state), state["cls_token"].shape[-1]
    out = {"mask_token": torch.zeros(1, d)}
    if arch == "dinov2_reg4_tiny_test":  # official: pos_embed has a CLS row, cls_token excludes it
        cls_pos = torch.randn(1, 1, d)
        out.update(
            register_tokens=state.pop("reg_token"),
            cls_token=state.pop("cls_token") - cls_pos[:, 0],
            pos_embed=torch.cat([cls_pos, state.pop("pos_embed")], 1),
        )
    if arch == "dinov3_tiny_test":
        out.update(storage_tokens=state.pop("reg_token"), **{"rope_embed.periods": torch.rand(6)})
        for i in range(2):
            out[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * d)
            out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * d)
        state = {k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma"): v for k, v in state.items()}
    return {**state, **out}


@pytest.mark.parametrize("arch", FAMILIES[1:])
def test_official_checkpoint_formats(tmp_path, arch):
    src = perturbed(arch).vit.state_dict()
    path = tmp_path / f"{arch}_pretrain.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in official_format(arch, src).items()}}, path)
    loaded = build_encoder(EncoderConfig(arch=arch, weights=str(path))).vit.state_dict()
    assert loaded.keys() == src.keys() and all(torch.allclose(loaded[k], v, atol=1e-6) for k, v in src.items())
    broken = official_format(arch, src)
    del broken["norm.weight"]
    torch.save(broken, bad := tmp_path / "bad.pth")
    with pytest.raises(
        EncoderLoadError, match=rf"bad\.pth: does not match encoder '{arch}'.*missing keys: norm\.weight"
    ):
        build_encoder(EncoderConfig(arch=arch, weights=str(bad)))
    other = "dinov2_tiny_test" if "dinov3" in arch else "dinov3_tiny_test"  # the other family's file
    with pytest.raises(EncoderLoadError, match=rf"{arch}_pretrain\.pth: does not match encoder '{other}'"):
        build_encoder(EncoderConfig(arch=other, weights=str(path)))
