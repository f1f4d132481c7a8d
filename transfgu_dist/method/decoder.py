"""Segmenter's mask transformer decoder (paper sec 3.1, Eq. 2).

Patch tokens and `n_outputs` learned class embeddings (one per output channel: the K concepts, plus the
background channel of things-only presets) pass jointly through N transformer blocks; the masks are the
products of the final patch and class embeddings: x' C^T / sqrt(d) (Eq. 2, `scaled_dot`), or the reference's
cosine similarity followed by a LayerNorm over the output channels (`cosine_ln`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from transfgu_dist.config import DecoderConfig


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (B, n_outputs, h, w) masks at the patch grid, before softmax
    class_emb: torch.Tensor  # (B, n_outputs, d) C of Eq. 2, as used by the diversity loss (Eq. 15)


class MaskTransformer(nn.Module):
    def __init__(self, dim: int, n_outputs: int, cfg: DecoderConfig):
        super().__init__()
        self.n_outputs, self.mask_head = n_outputs, cfg.mask_head
        self.proj_dec = nn.Linear(dim, dim)
        self.cls_emb = nn.Parameter(torch.zeros(1, n_outputs, dim))
        self.blocks = nn.ModuleList(
            Block(
                dim,
                cfg.n_heads,
                qkv_bias=False,
                proj_drop=cfg.dropout,
                attn_drop=cfg.dropout,
                norm_layer=partial(nn.LayerNorm, eps=cfg.block_eps),
            )
            for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))
        self.proj_classes = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))
        self.mask_norm = nn.LayerNorm(n_outputs) if cfg.mask_head == "cosine_ln" else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if cfg.class_init == "orthogonal":  # reference: one unit vector of length K*d, rows of norm ~1/sqrt(K)
            nn.init.orthogonal_(self.cls_emb)
        else:
            trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, patch: torch.Tensor) -> DecoderOutput:
        """patch: encoder patch tokens x^patch (B, h, w, D)."""
        B, h, w, _ = patch.shape
        x = torch.cat([self.proj_dec(patch.flatten(1, 2)), self.cls_emb.expand(B, -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        patches, classes = x[:, : h * w] @ self.proj_patch, x[:, h * w :] @ self.proj_classes
        if self.mask_head == "scaled_dot":
            masks = patches @ classes.transpose(1, 2) / math.sqrt(patches.shape[-1])
        else:
            masks = F.normalize(patches, dim=-1) @ F.normalize(classes, dim=-1).transpose(1, 2)
        masks = self.mask_norm(masks)
        return DecoderOutput(logits=masks.transpose(1, 2).unflatten(2, (h, w)), class_emb=classes)
