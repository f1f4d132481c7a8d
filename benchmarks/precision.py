"""Agreement of each encoder precision with fp32 (`jobs/bench.py --size precision`); no Ray, FAISS or MLflow.

On the same inputs (synthetic scenes resized bilinearly) and the same random-weight encoder, concepts and decoder
(no DINO weights are reachable offline), the share of pixels whose argmax under a precision equals fp32's:
- `gradcam_k{K}`: the Grad-CAM response maps of K concepts (Eqs 5-7, pseudo_label's labels),
- `fg_prior`: the binarised A_L^cls (sec 4.2, extract's fg/bg decisions),
- `eval_labels`: the decoder's labels at the eval size (sec 7.1, evaluate and predict),
and for the bank's stored terms (transfgu_dist.io.bank) the argmax of the decoded fp32 maps against the fp32
Grad-CAM maps, fp16 and fp32 terms (`bank_terms_{dtype}_k{K}`). On a CPU bf16 runs under CPU autocast (an emulation
of the GPU's bf16 arithmetic) and tf32 is fp32 (no TF32 units); on a GPU every precision is measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from transfgu_dist.config import DecoderConfig, EncoderConfig, PseudoLabelConfig
from transfgu_dist.inference.segmenter import predict
from transfgu_dist.io import bank
from transfgu_dist.io.images import to_float_batch
from transfgu_dist.io.synthetic import make_scene
from transfgu_dist.io.weights import build_encoder
from transfgu_dist.method.crops import foreground_prior
from transfgu_dist.method.decoder import MaskTransformer
from transfgu_dist.method.encoder import normalize
from transfgu_dist.method.gradcam import compose, gradcam_terms
from transfgu_dist.method.precision import PRECISIONS, autocast


@dataclass(frozen=True)
class PrecisionSize:
    arch: str
    image_size: int  # Grad-CAM, prior and eval images (square)
    images: int
    ks: tuple[int, ...]


PRECISION_SIZES = {
    "tiny": PrecisionSize("vit_tiny_test", 64, 2, (5, 9)),
    "small": PrecisionSize("vit_small_patch8", 160, 2, (27, 171)),
}


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return round((a == b).float().mean().item(), 5)


def run_precision(size: str = "small", log: Callable[[str], None] = print) -> dict[str, Any]:
    s = PRECISION_SIZES[size]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(arch=s.arch, weights="random")).to(dev).eval()
    decoder = MaskTransformer(encoder.dim, s.ks[0], DecoderConfig()).to(dev).eval()
    gen = torch.Generator().manual_seed(0)
    concepts = {k: torch.randn(k, encoder.dim, generator=gen).to(dev) for k in s.ks}
    side = (s.image_size, s.image_size)
    scenes = [make_scene(i, (2 * s.image_size, 2 * s.image_size))[0] for i in range(s.images)]
    images = to_float_batch(scenes, side, "bilinear").to(dev)
    cfg = PseudoLabelConfig(image_size=side)

    def outputs(precision: str) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor, Any, float]:
        start = time.perf_counter()
        with autocast(dev, precision):
            terms = {k: gradcam_terms(encoder, normalize(images), c, cfg)[:2] for k, c in concepts.items()}
            with torch.no_grad():
                prior = foreground_prior(encoder(normalize(images), with_patch=False).attn.float())
        labels = torch.from_numpy(predict(encoder, decoder, images, side, precision=precision))
        return terms, prior, labels, time.perf_counter() - start

    ref_terms, ref_prior, ref_labels, ref_seconds = outputs("fp32")
    ref_argmax = {k: compose(*t).argmax(1) for k, t in ref_terms.items()}
    figures: dict[str, Any] = {"fp32": {"seconds": round(ref_seconds, 3)}}
    for precision in (p for p in PRECISIONS if p != "fp32"):
        terms, prior, labels, seconds = outputs(precision)
        figures[precision] = {
            **{f"gradcam_k{k}": _agreement(compose(*terms[k]).argmax(1), ref_argmax[k]) for k in s.ks},
            "fg_prior": _agreement(prior, ref_prior),
            "eval_labels": _agreement(labels, ref_labels),
            "seconds": round(seconds, 3),
        }
        log(f"{precision} vs fp32 on {dev.type}: {figures[precision]}")
    stored = {}
    for dtype in ("float16", "float32"):
        for k, (shared, terms) in ref_terms.items():
            s32, t, scale = (torch.from_numpy(a) for a in bank.encode(shared, terms, dtype))
            maps = bank.decode(s32.view_as(shared), t.float().view_as(terms), scale)
            stored[f"bank_terms_{dtype}_k{k}"] = _agreement(maps.argmax(1), ref_argmax[k].cpu())
    log(f"bank terms vs fp32 maps: {stored}")
    return {"device": dev.type, "size": size, "sizes": asdict(s), "precisions": figures, "bank": stored}
