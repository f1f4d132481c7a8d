"""The frozen DINO ViT encoder (paper sec 3.1, Eqs 1, 3, 4).

A timm ViT (DINO v1, DINOv2 with or without registers: VisionTransformer; DINOv3: Eva with RoPE) whose last
block is run by hand so that the CLS query row of its attention map, A_L^cls, is an explicit tensor: Grad-CAM
(Eqs 5-7) differentiates the final CLS token with respect to it, and only the CLS path of the last block has to
be back-propagated. Tokens are [CLS, registers..., patches]; `n_prefix` counts CLS plus registers.
DINO v1 weights interpolate their position table by DINO's own rule (`dino_pos_embed`), not timm's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from transfgu_dist.config import ARCHS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# newer families: arch -> timm model function (built with the ARCHS width/depth/heads)
TIMM_MODELS = {
    **{a: a for a in ARCHS if "dinov" in a and not a.endswith("_test")},
    "dinov2_tiny_test": "vit_small_patch14_dinov2",
    "dinov2_reg4_tiny_test": "vit_small_patch14_reg4_dinov2",
    "dinov3_tiny_test": "vit_small_patch16_dinov3",
}


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """Float NCHW in [0, 1] -> ImageNet-normalised (per-channel ``(x - mean) / std``)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean) / std


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
    patch = F.interpolate(
        patch, scale_factor=((grid[0] + 0.1) / n, (grid[1] + 0.1) / n), mode="bicubic", align_corners=False
    )
    assert tuple(patch.shape[-2:]) == grid, (patch.shape, grid)
    return torch.cat([table[:, :1], patch.flatten(2).transpose(1, 2)], dim=1)


@dataclass
class EncoderOutput:
    cls: torch.Tensor  # (B, D) final CLS token x^cls (after the final LayerNorm)
    cls_attn: torch.Tensor  # (B, heads, N) CLS query row of the last attention map (Eq. 1), N = n_prefix + hw
    patch: torch.Tensor | None  # (B, h, w, D) final patch tokens x^patch, when asked for
    grid: tuple[int, int]  # (h, w)
    values: torch.Tensor  # (B, heads, N, D / heads) V of the last block
    cls_attended: torch.Tensor  # (B, heads, 1, D / heads) cls_attn @ values, on the way from cls_attn to cls
    n_prefix: int = 1  # CLS + register tokens before the patches; registers are neither patches nor concepts

    @property
    def attn(self) -> torch.Tensor:
        """A_L^cls: head-averaged CLS-to-patch attention, (B, h, w) (sec 3.2)."""
        return self.cls_attn[:, :, self.n_prefix :].mean(1).unflatten(1, self.grid)


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
            self.vit = timm.create_model(
                TIMM_MODELS[arch],
                pretrained=False,
                num_classes=0,
                dynamic_img_size=True,
                embed_dim=dim,
                depth=depth,
                num_heads=heads,
            )
        else:
            self.vit = VisionTransformer(
                img_size=224,
                patch_size=patch,
                embed_dim=dim,
                depth=depth,
                num_heads=heads,
                num_classes=0,
                dynamic_img_size=True,
            )
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
        return EncoderOutput(
            cls=cls, cls_attn=row, patch=patch, grid=(H // p, W // p), values=v, cls_attended=attended, n_prefix=npt
        )

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
