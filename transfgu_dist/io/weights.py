"""Encoder weights: official DINO / DINOv2 / DINOv3 checkpoints from a local path or s3://, or timm's DINO tags,
loaded into the frozen ViTEncoder (method.encoder); the only module that reads weights from storage or a hub."""

from __future__ import annotations

import contextlib
import io
import logging
import os

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from transfgu_dist.config import ARCHS, EncoderConfig
from transfgu_dist.io import storage
from transfgu_dist.method.encoder import ViTEncoder

log = logging.getLogger(__name__)


class EncoderLoadError(RuntimeError):
    """Encoder weights could not be loaded; the message names the source and what was expected."""


def _unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Accept the published DINO formats: a plain state dict, or a training checkpoint holding one."""
    for key in ("teacher", "state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EncoderLoadError(f"{source}: expected a DINO ViT state dict (tensor per key), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone."):
            k = k.removeprefix(prefix)
        if not k.startswith("head."):
            out[k] = v
    return out


def load_dino_weights(encoder: ViTEncoder, uri: str) -> None:
    """Load an official checkpoint from a local path or s3:// URI: DINO (dino_deitsmall8_pretrain.pth), DINOv2
    (dinov2_vits14[_reg4]_pretrain.pth) or DINOv3 (dinov3_vits16_pretrain_lvd1689m-*.pth), or a timm state dict."""
    if not storage.exists(uri):
        raise EncoderLoadError(
            f"{uri}: encoder checkpoint not found (expected a DINO .pth state dict for {encoder.arch})"
        )
    with storage.local_copy(uri) as path:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a wrong file
            raise EncoderLoadError(f"{uri}: not a readable PyTorch checkpoint ({e})") from e
    state = _unwrap_state_dict(obj, uri)
    if not encoder.dino_v1:
        state = _official_to_timm(state, encoder, uri)
    expected = encoder.vit.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong))
            if keys
        )
        raise EncoderLoadError(
            f"{uri}: does not match encoder '{encoder.arch}' "
            f"(expected {len(expected)} ViT keys such as 'blocks.0.attn.qkv.weight'); {detail}"
        )
    encoder.vit.load_state_dict(state)


def _official_to_timm(state: dict[str, torch.Tensor], encoder: ViTEncoder, uri: str) -> dict[str, torch.Tensor]:
    """Official DINOv2 / DINOv3 keys (register_tokens, storage_tokens, ls1.gamma, qkv.bias, ...) to timm's, by
    timm's own checkpoint filters; a timm-format state dict passes through unchanged."""
    from timm.models import eva, vision_transformer

    filt = vision_transformer if isinstance(encoder.vit, VisionTransformer) else eva
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # eva's filter prints each bias it skips
            return filt.checkpoint_filter_fn(dict(state), encoder.vit)
    except Exception as e:  # noqa: BLE001 - a foreign layout fails inside timm in many ways
        raise EncoderLoadError(f"{uri}: not an official {encoder.arch} checkpoint ({type(e).__name__}: {e})") from e


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """One quick TCP connect to the weights hub (so an offline machine fails in one attempt, not after retries)."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_timm_dino(encoder: ViTEncoder) -> None:
    tag = ARCHS[encoder.arch][4]
    if tag is None:
        raise EncoderLoadError(f"encoder '{encoder.arch}' has no pretrained DINO weights in timm")
    if not os.environ.get("HF_HUB_OFFLINE") and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # cached weights still load; no download retries
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        model = timm.create_model(tag, pretrained=True, num_classes=0, dynamic_img_size=True)
    except Exception as e:  # noqa: BLE001 - offline hubs raise many different errors
        reason = (
            "huggingface.co unreachable and not in the local cache"
            if os.environ.get("HF_HUB_OFFLINE")
            else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
        raise EncoderLoadError(
            f"timm weights '{tag}' could not be loaded ({reason}); "
            f"give encoder.weights a local or s3:// DINO checkpoint instead"
        ) from e
    encoder.vit.load_state_dict(model.state_dict())


def build_encoder(cfg: EncoderConfig) -> ViTEncoder:
    """The frozen encoder with the configured weights ("random" weights are seeded, hence the same everywhere)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = ViTEncoder(cfg.arch)
    if cfg.weights == "timm":
        _load_timm_dino(encoder)
    elif cfg.weights != "random":
        load_dino_weights(encoder, cfg.weights)
    return encoder


def resolve_encoder(cfg: EncoderConfig) -> EncoderConfig:
    """Check that the configured weights load. With `random_fallback` and the default weights (`timm`) only, fall
    back in one warning line to a small random ViT; an explicit checkpoint path must load."""
    try:
        build_encoder(cfg)
        return cfg
    except EncoderLoadError as e:
        if not cfg.random_fallback or cfg.weights != "timm":
            raise
        log.warning("RANDOM ENCODER (vit_tiny_test): %s; the segmentation will be far from what DINO weights give", e)
        return EncoderConfig(arch="vit_tiny_test", weights="random")
