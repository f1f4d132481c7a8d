"""The encoder matches timm's own forward, loads DINO-format checkpoints, and batched Grad-CAM equals a K-loop."""
import pytest
import torch

from transfgu_dist.config import EncoderConfig, PseudoLabelConfig
from transfgu_dist.encoder import EncoderLoadError, build_encoder, load_dino_weights, resolve_encoder, ViTEncoder
from transfgu_dist.pseudo_labels import attention_gradients, concept_similarity, gradcam


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


def test_forward_matches_timm_any_size(encoder):
    x = torch.randn(2, 3, 48, 72)  # not the 224 of the positional embedding: interpolated
    out = encoder(x)
    ref = encoder.vit.forward_features(x)
    assert out.grid == (6, 9) and out.patch.shape == (2, 6, 9, 48)
    assert torch.allclose(out.cls, ref[:, 0], atol=1e-5)
    assert torch.allclose(out.patch.flatten(1, 2), ref[:, 1:], atol=1e-5)
    assert torch.allclose(out.cls_attn, timm_last_attention(encoder.vit, x), atol=1e-6)
    assert out.attn.shape == (2, 6, 9)
    assert torch.allclose(out.attn.sum((1, 2)) + out.cls_attn[:, :, 0].mean(1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        encoder(torch.randn(1, 3, 50, 48))


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


@pytest.mark.parametrize("kind,scale", [("dot", 1.0), ("cosine", 0.125)])
def test_batched_gradcam_equals_k_backward_loop(encoder, kind, scale):
    torch.manual_seed(0)
    images, concepts = torch.randn(3, 3, 32, 40), torch.randn(5, 48)
    batched = attention_gradients(encoder(images, with_patch=False, attn_grad=True), concepts, kind, scale)
    loop = []
    for k in range(concepts.shape[0]):
        out = encoder(images, with_patch=False, attn_grad=True)
        loss = scale * (1 - concept_similarity(out.cls, concepts, kind)[:, k]).sum()
        (g,) = torch.autograd.grad(loss, out.cls_attn)
        loop.append(g[..., 1:].mean(1).unflatten(1, out.grid))
    assert batched.shape == (3, 5, 4, 5)
    assert torch.allclose(batched, torch.stack(loop, dim=1), atol=1e-5)
    maps, attn = gradcam(encoder, images, concepts, PseudoLabelConfig(similarity=kind, loss_scale=scale))
    assert maps.shape == (3, 5, 4, 5) and attn.shape == (3, 4, 5) and not maps.requires_grad
