"""The frozen DINO ViT encoder (paper sec 3.1, Eqs 1, 3, 4).

A timm ViT (DINO v1, DINOv2 with or without registers: VisionTransformer; DINOv3: Eva with RoPE) whose last
block is run by hand so that the CLS query row of its attention map, A_L^cls, is an explicit tensor: Grad-CAM
(Eqs 5-7) differentiates the final CLS token with respect to it, and only the CLS path of the last block has to
be back-propagated. Tokens are [CLS, registers..., patches]; `n_prefix` counts CLS plus registers.
DINO v1 weights interpolate their position table by DINO's own rule (`dino_pos_embed`), not timm's.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass

import math

import timm
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from transfgu_dist import storage
from transfgu_dist.config import EncoderConfig

log = logging.getLogger(__name__)

# name -> (patch size, width, depth, heads, timm pretrained tag with DINO weights)
ARCHS: dict[str, tuple[int, int, int, int, str | None]] = {
    "vit_small_patch8": (8, 384, 12, 6, "vit_small_patch8_224.dino"),
    "vit_small_patch16": (16, 384, 12, 6, "vit_small_patch16_224.dino"),
    "vit_base_patch8": (8, 768, 12, 12, "vit_base_patch8_224.dino"),
    "vit_base_patch16": (16, 768, 12, 12, "vit_base_patch16_224.dino"),
    "vit_tiny_test": (8, 48, 2, 2, None),  # random weights, for tests and the laptop demo
    "vit_small_patch14_dinov2": (14, 384, 12, 6, "vit_small_patch14_dinov2.lvd142m"),
    "vit_base_patch14_dinov2": (14, 768, 12, 12, "vit_base_patch14_dinov2.lvd142m"),
    "vit_small_patch14_reg4_dinov2": (14, 384, 12, 6, "vit_small_patch14_reg4_dinov2.lvd142m"),
    "vit_base_patch14_reg4_dinov2": (14, 768, 12, 12, "vit_base_patch14_reg4_dinov2.lvd142m"),
    "vit_small_patch16_dinov3": (16, 384, 12, 6, "vit_small_patch16_dinov3.lvd1689m"),
    "vit_base_patch16_dinov3": (16, 768, 12, 12, "vit_base_patch16_dinov3.lvd1689m"),
    # tiny random members of each newer family: the real timm model class and code path, reduced width/depth
    "dinov2_tiny_test": (14, 48, 2, 2, None),
    "dinov2_reg4_tiny_test": (14, 48, 2, 2, None),
    "dinov3_tiny_test": (16, 48, 2, 2, None),
}
# newer families: arch -> timm model function (built with the ARCHS width/depth/heads)
TIMM_MODELS = {
    **{a: a for a in ARCHS if "dinov" in a and not a.endswith("_test")},
    "dinov2_tiny_test": "vit_small_patch14_dinov2",
    "dinov2_reg4_tiny_test": "vit_small_patch14_reg4_dinov2",
    "dinov3_tiny_test": "vit_small_patch16_dinov3",
}


def dino_pos_embed(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """DINO v1's position table for an h x w patch grid (its `interpolate_pos_encoding`; DINOv2's without
    registers, built with interpolate_offset 0.1 and no antialias, is the same rule).

    table: (1, 1 + n*n, D), CLS entry first. Used as is at the table's own grid; otherwise the n x n patch part
    is resized by plain bicubic (align_corners False, no antialias) with scale factors ((h + 0.1)/n, (w + 0.1)/n),
    the factors themselves (not recomputed from the output size) mapping output to input coordinates.
    """
    n, grid = math.isqrt(table.shape[1] - 1), (int(grid[0]), int(grid[1]))  # ints: constants when traced
    if grid == (n, n):
        return table
    patch = table[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((grid[0] + 0.1) / n, (grid[1] + 0.1) / n), mode="bicubic",
                          align_corners=False)
    assert tuple(patch.shape[-2:]) == grid, (patch.shape, grid)
    return torch.cat([table[:, :1], patch.flatten(2).transpose(1, 2)], dim=1)


class EncoderLoadError(RuntimeError):
    """Encoder weights could not be loaded; the message names the source and what was expected."""


@dataclass
class EncoderOutput:
    cls: torch.Tensor            # (B, D) final CLS token x^cls (after the final LayerNorm)
    cls_attn: torch.Tensor       # (B, heads, N) CLS query row of the last attention map (Eq. 1), N = n_prefix + hw
    patch: torch.Tensor | None   # (B, h, w, D) final patch tokens x^patch, when asked for
    grid: tuple[int, int]        # (h, w)
    values: torch.Tensor         # (B, heads, N, D / heads) V of the last block
    cls_attended: torch.Tensor   # (B, heads, 1, D / heads) cls_attn @ values, on the way from cls_attn to cls
    n_prefix: int = 1            # CLS + register tokens before the patches; registers are neither patches nor concepts

    @property
    def attn(self) -> torch.Tensor:
        """A_L^cls: head-averaged CLS-to-patch attention, (B, h, w) (sec 3.2)."""
        return self.cls_attn[:, :, self.n_prefix:].mean(1).unflatten(1, self.grid)


def _layer_scale(block: nn.Module, i: int, y: torch.Tensor) -> torch.Tensor:
    """LayerScale i of a block: timm's ViT Block keeps it as `ls{i}`, Eva as the parameter `gamma_{i}`."""
    if hasattr(block, f"ls{i}"):
        return getattr(block, f"ls{i}")(y)
    gamma = getattr(block, f"gamma_{i}")
    return y if gamma is None else gamma * y


class ViTEncoder(nn.Module):
    """Frozen ViT; forward accepts any input whose sides are multiples of the patch size."""

    def __init__(self, arch: str):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown encoder arch '{arch}' (known: {', '.join(ARCHS)})")
        patch, dim, depth, heads, _ = ARCHS[arch]
        self.arch, self.patch_size, self.dim = arch, patch, dim
        if arch in TIMM_MODELS:
            self.vit = timm.create_model(TIMM_MODELS[arch], pretrained=False, num_classes=0, dynamic_img_size=True,
                                         embed_dim=dim, depth=depth, num_heads=heads)
        else:
            self.vit = VisionTransformer(img_size=224, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                                         num_classes=0, dynamic_img_size=True)
        self.dino_v1 = arch not in TIMM_MODELS
        self.n_prefix = self.vit.num_prefix_tokens
        # DINO's table rule: DINO v1, and DINOv2 without registers (its hub builds them with interpolate_offset=0.1
        # and no antialias); the reg4 models' own rule (size=, antialias) is timm's resample exactly
        self.offset_table = self.dino_v1 or (isinstance(self.vit, VisionTransformer) and self.n_prefix == 1)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ViTEncoder:
        return super().train(False)  # always frozen (sec 4.2)

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input tokens of the first block, (B, N, D), and the RoPE table (DINOv3) or None."""
        vit = self.vit
        x = vit.patch_embed(images)  # (B, h, w, D)
        rope = None
        if self.offset_table:
            pos = dino_pos_embed(vit.pos_embed, x.shape[1:3])
            x = vit.pos_drop(torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x.flatten(1, 2)], 1) + pos)
        elif isinstance(vit, VisionTransformer):
            x = vit.patch_drop(vit._pos_embed(x))  # DINOv2 reg4: timm's resample of the table
        else:
            x, rope = vit._pos_embed(x)  # Eva: RoPE for the patch tokens
        return vit.norm_pre(x), rope

    def forward(self, images: torch.Tensor, with_patch: bool = True, attn_grad: bool = False) -> EncoderOutput:
        """Encode ImageNet-normalised images (B, 3, H, W).

        attn_grad: make `cls_attn` a leaf that requires grad, with `cls` computed from it, so that
        torch.autograd.grad(f(cls), cls_attn) gives the gradient on A_L^cls through the last block only.
        """
        B, _, H, W = images.shape
        p, npt = self.patch_size, self.n_prefix
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not divisible by the patch size {p}")
        vit, last = self.vit, self.vit.blocks[-1]
        with torch.no_grad():
            x, rope = self.tokens(images)
            for blk in vit.blocks[:-1]:
                x = blk(x) if rope is None else blk(x, rope=rope)
            q, k, v = self._qkv(last.norm1(x), rope)
            row = ((q[:, :, :1] * last.attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0]  # (B, heads, N), Eq. 1
            patch = None
            if with_patch:
                out = F.scaled_dot_product_attention(q[:, :, npt:], k, v)
                patch = self._finish(out, x[:, npt:]).unflatten(1, (H // p, W // p))
        if attn_grad:
            row = row.detach().requires_grad_()
        with torch.set_grad_enabled(attn_grad):
            attended = row.unsqueeze(2) @ v
            cls = self._finish(attended, x[:, :1])[:, 0]
        return EncoderOutput(cls=cls, cls_attn=row, patch=patch, grid=(H // p, W // p), values=v,
                             cls_attended=attended, n_prefix=npt)

    def _qkv(self, x: torch.Tensor, rope: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """q, k, v (B, heads, N, d) of the last block as timm computes them (Eva: q/v bias, RoPE past the prefix)."""
        attn = self.vit.blocks[-1].attn
        bias = getattr(attn, "q_bias", None)
        if bias is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias if bias is None else bias)
        q, k, v = qkv.unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            npt, half = self.n_prefix, attn.rotate_half
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], 2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], 2).type_as(v)
        return q, k, v

    def _finish(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Rest of the last block for some query rows: head merge, projection, LayerScale, MLP, final norm."""
        last = self.vit.blocks[-1]
        y = attended.transpose(1, 2).flatten(2)
        y = residual + _layer_scale(last, 1, last.attn.proj(last.attn.norm(y)))
        y = y + _layer_scale(last, 2, last.mlp(last.norm2(y)))
        return self.vit.norm(y)


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
        raise EncoderLoadError(f"{uri}: encoder checkpoint not found (expected a DINO .pth state dict for "
                               f"{encoder.arch})")
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
        detail = "; ".join(f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                           for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                              ("shape mismatch", wrong)) if keys)
        raise EncoderLoadError(f"{uri}: does not match encoder '{encoder.arch}' "
                               f"(expected {len(expected)} ViT keys such as 'blocks.0.attn.qkv.weight'); {detail}")
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
        reason = "huggingface.co unreachable and not in the local cache" if os.environ.get("HF_HUB_OFFLINE") \
            else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise EncoderLoadError(f"timm weights '{tag}' could not be loaded ({reason}); "
                               f"give encoder.weights a local or s3:// DINO checkpoint instead") from e
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
        log.warning("RANDOM ENCODER (vit_tiny_test): %s; the segmentation will be far from what DINO weights give",
                    e)
        return EncoderConfig(arch="vit_tiny_test", weights="random")
