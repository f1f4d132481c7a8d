"""Grad-CAM response maps of the K concepts on the last attention map (paper Eqs 5-8).

All K maps come from ONE forward and ONE batched backward through the last block's CLS path only (only the CLS
query row of the last block feeds the final CLS token): the losses of all concepts (B, K) are differentiated with
`is_grads_batched` down to the CLS row's attention output A V, and the last step to A is one GEMM for all K at
once, dL/dA = (dL/d(A V)) V^T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from transfgu_dist.config import PseudoLabelConfig
from transfgu_dist.method.encoder import EncoderOutput, ViTEncoder


def concept_similarity(x_cls: torch.Tensor, concepts: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, K) similarity of CLS tokens to concepts S: `dot` is x S^T / sqrt(d) (Eq. 5), `cosine` the reference's."""
    if kind == "dot":
        return x_cls @ concepts.T / math.sqrt(x_cls.shape[-1])
    return F.normalize(x_cls, dim=-1) @ F.normalize(concepts, dim=-1).T


def attention_gradients(out: EncoderOutput, concepts: torch.Tensor, kind: str, loss_scale: float = 1.0) -> torch.Tensor:
    """d loss_k / d A_L^cls for every concept k, averaged over heads: (B, K, h, w).

    loss_k = loss_scale * (1 - sim(x_cls, S_k)) (Eq. 5); `out` must come from the encoder with attn_grad=True.
    loss_scale = 1/N reproduces the reference's batch-mean loss over a Grad-CAM batch of N images.
    """
    loss = loss_scale * (1 - concept_similarity(out.cls, concepts, kind))  # (B, K)
    B, K = loss.shape
    one_hot = torch.eye(K, dtype=loss.dtype, device=loss.device).unsqueeze(1).expand(K, B, K)
    (g,) = torch.autograd.grad(loss, out.cls_attended, grad_outputs=one_hot, is_grads_batched=True)  # (K,B,heads,1,d)
    # Differentiated down to A itself under vmap, V was expanded K times: on CPU at K = 171 that made the batched
    # backward slower than a loop of K backwards, and Grad-CAM 1.5x slower than this GEMM (docs/performance.md).
    grad = g.squeeze(3).permute(1, 2, 0, 3) @ out.values.transpose(-2, -1)  # (B, heads, K, N)
    return grad[..., out.n_prefix :].mean(1).unflatten(2, out.grid)  # (B, K, h, w): patches after CLS + registers


def top_mass_mask(x: torch.Tensor, mass: float) -> torch.Tensor:
    """Per map (last two dims), True on the largest entries that together hold `mass` of its total (DINO-style)."""
    flat = x.flatten(-2)
    values, order = flat.sort(dim=-1)  # ascending
    cum = (values / values.sum(-1, keepdim=True).clamp_min(1e-12)).cumsum(-1)
    keep_sorted = cum > (1 - mass)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted).view_as(x)


def response_terms(attn: torch.Tensor, grad: torch.Tensor, cfg: PseudoLabelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """M^k split as a shared term (B, h, w) and per-concept terms (B, K, h, w), NaN where M^k is forced to 0.

    paper (Eq. 7): M^k = GRAD-CAM + A, with GRAD-CAM = -d loss_k / dA = d sim_k / dA, the direction that
      increases the similarity Eq. 5 maximises: shared A, terms -grad.
    reference: A / max(A) plus the rectified negative gradient kept on its top `top_mass` mass, and M^k = 0
      wherever the gradient is positive (NaN there).
    The shared term is the same for every concept, so the argmax over k is decided by the terms alone: stored
    apart they keep fp16's relative precision (transfgu_dist.io.bank); summed first they do not (the argmax of
    about a quarter of the pixels changed).
    """
    if cfg.response == "paper":
        return attn, -grad
    evidence = (-grad).clamp_min(0)
    evidence = evidence * top_mass_mask(evidence, cfg.top_mass)
    shared = attn / attn.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return shared, evidence.masked_fill(grad > 0, float("nan"))


def compose(shared: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """M^k = shared + term_k, and 0 where the term is NaN: (B, K, h, w) in the wider of the two dtypes."""
    maps = shared.unsqueeze(1) + terms
    return maps.masked_fill(terms.isnan(), 0.0)


def response_maps(attn: torch.Tensor, grad: torch.Tensor, cfg: PseudoLabelConfig) -> torch.Tensor:
    """Response maps M^k (B, K, h, w) from A_L^cls (B, h, w) and the loss gradients (B, K, h, w) (Eq. 7)."""
    return compose(*response_terms(attn, grad, cfg))


def gradcam_terms(
    encoder: ViTEncoder, images: torch.Tensor, concepts: torch.Tensor, cfg: PseudoLabelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared term (B, h, w), per-concept terms (B, K, h, w) (see `response_terms`) and A_L^cls (B, h, w) for a
    batch of normalised images. pseudo.loss_scale None: 1/len(images), the reference's batch-mean loss."""
    out = encoder(images, with_patch=False, attn_grad=True)
    scale = 1 / len(images) if cfg.loss_scale is None else cfg.loss_scale
    grad = attention_gradients(out, concepts.to(out.cls.dtype), cfg.similarity, scale)
    attn = out.attn.detach()
    shared, terms = response_terms(attn.float(), grad.detach().float(), cfg)
    return shared, terms, attn


def gradcam(
    encoder: ViTEncoder, images: torch.Tensor, concepts: torch.Tensor, cfg: PseudoLabelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Response maps (B, K, h, w) of all concepts for a batch of normalised images, and A_L^cls (B, h, w)."""
    shared, terms, attn = gradcam_terms(encoder, images, concepts, cfg)
    return compose(shared, terms), attn
