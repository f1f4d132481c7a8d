"""`jobs/bench.py --size backbones`: each backbone's extract and Grad-CAM cost against DINO ViT-S/8.

Every family is built at its real size with seeded random weights (no download) and run at the sizes its preset
uses: the extract forward on crops (Eq. 3; `encoder(crops, with_patch=False)`) and the batched Grad-CAM at K = 27
(Eqs 5-8; one forward and one batched backward), both under bf16 autocast on GPU (fp32 on CPU). The reference (the
first arch, DINO ViT-S/8 by default) is timed in the same run, every repeat running each path of each arch in
turn, so drifting load on shared cores hits the ratios alike. No Ray, FAISS or MLflow is imported.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

BACKBONES = (
    "vit_small_patch8",
    "vit_small_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_small_patch16_dinov3",
    "vit_base_patch14_dinov2",
    "vit_base_patch14_reg4_dinov2",
    "vit_base_patch16_dinov3",
)
# patch -> (crop side of extract, image side of Grad-CAM): the README's presets, a 40 x 40 Grad-CAM grid each
PRESET_SIDES = {8: (320, 320), 14: (280, 560), 16: (320, 640)}
AMP = {"cuda": "bf16", "cpu": "fp32"}  # the speed comparison runs at bf16 on a GPU (method.precision)


@dataclass(frozen=True)
class BackboneSize:
    crop_batch: int  # crops per extract forward
    cam_batch: int  # images per Grad-CAM call
    repeats: int
    k: int = 27
    divide: int = 1  # every preset side divided by this (quick checks; 1 = the presets)

    def per_item(self, path: str) -> int:
        return self.crop_batch if path == "extract" else self.cam_batch


BACKBONE_SIZES = {
    "cpu": BackboneSize(crop_batch=2, cam_batch=1, repeats=2),
    "cuda": BackboneSize(crop_batch=64, cam_batch=8, repeats=5),
}


def _paths(arch: str, size: BackboneSize, dev) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """The extract and Grad-CAM calls of one backbone, and what they run at."""
    import torch

    from transfgu_dist.config import EncoderConfig, PseudoLabelConfig
    from transfgu_dist.io.weights import build_encoder
    from transfgu_dist.method.gradcam import gradcam
    from transfgu_dist.method.precision import autocast

    encoder = build_encoder(EncoderConfig(arch=arch, weights="random")).to(dev).eval()
    crop, cam = (side // size.divide for side in PRESET_SIDES[encoder.patch_size])
    if crop % encoder.patch_size or cam % encoder.patch_size:
        raise ValueError(
            f"divide={size.divide}: the sides {PRESET_SIDES[encoder.patch_size]} of {arch} / divide "
            f"must stay multiples of its patch {encoder.patch_size}"
        )
    gen = torch.Generator().manual_seed(0)
    crops = torch.randn(size.crop_batch, 3, crop, crop, generator=gen).to(dev)
    images = torch.randn(size.cam_batch, 3, cam, cam, generator=gen).to(dev)
    concepts = torch.randn(size.k, encoder.dim, generator=gen).to(dev)
    cfg = PseudoLabelConfig(image_size=(cam, cam), batch_size=size.cam_batch)

    def extract() -> None:
        with torch.no_grad(), autocast(dev, AMP[dev.type]):
            encoder(crops, with_patch=False)

    def grad_cam() -> None:
        with autocast(dev, AMP[dev.type]):
            gradcam(encoder, images, concepts, cfg)

    info = {
        "patch": encoder.patch_size,
        "dim": encoder.dim,
        "crop_size": crop,
        "gradcam_size": cam,
        "prefix_tokens": encoder.n_prefix,
        "params_m": round(sum(p.numel() for p in encoder.parameters()) / 1e6, 2),
    }
    return {"extract": extract, "gradcam": grad_cam}, info


def _warm_up(arch: str, size: BackboneSize, dev, row: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """Build `arch`, run each path once under the FLOP counter and PeakMemory (the warm-up), fill `row`."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.memory import PeakMemory

    fns, info = _paths(arch, size, dev)
    row.update(info, gflop_per_item={}, memory={})
    for name, fn in fns.items():
        counter = FlopCounterMode(display=False)
        with PeakMemory() as mem, counter:
            fn()
        row["gflop_per_item"][name] = round(counter.get_total_flops() / size.per_item(name) / 1e9, 3)
        extra = mem.result["driver_peak_rss_mb"] - mem.result.get("tree_start_rss_mb", 0.0)
        row["memory"][name] = {**mem.result, "call_extra_rss_mb": round(extra, 1)}
    return fns


def run_backbones(
    archs: Sequence[str] = BACKBONES, repeats: int | None = None, divide: int = 1, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Times every arch of `archs` (the first is the reference) at the preset sides / `divide`; returns the JSON
    document. All encoders stay built and every repeat runs each path of each arch in turn (measure_interleaved),
    so load that drifts over the run (shared cores) hits every ratio alike."""
    import statistics

    import timm
    import torch

    from benchmarks.env import device_name, measure_interleaved

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = dataclasses.replace(BACKBONE_SIZES[dev.type], divide=divide)
    size = dataclasses.replace(size, repeats=repeats or size.repeats)
    rows: dict[str, dict[str, Any]] = {arch: {} for arch in archs}
    calls = {}
    for arch in archs:
        for name, fn in _warm_up(arch, size, dev, rows[arch]).items():
            calls[f"{arch}/{name}"] = fn
        log(f"{arch}: built and warm ({rows[arch]['gflop_per_item']} GFLOP per item)")
    timed = measure_interleaved(calls, size.repeats, warmup=0)
    ref = archs[0]
    for key, timing in timed.items():
        arch, name = key.split("/")
        row = rows[arch]
        row.setdefault("runs_s_per_item", {})[name] = [round(r / size.per_item(name), 5) for r in timing["runs_s"]]
        row.setdefault("s_per_item", {})[name] = statistics.median(row["runs_s_per_item"][name])
    for arch, row in rows.items():
        row["vs_reference"] = {n: round(s / rows[ref]["s_per_item"][n], 3) for n, s in row["s_per_item"].items()}
        row["gflop_vs_reference"] = {
            n: round(g / rows[ref]["gflop_per_item"][n], 3) for n, g in row["gflop_per_item"].items()
        }
        log(f"{arch}: {row['s_per_item']} s per item, {row['vs_reference']} x the reference")
    return {
        "size": "backbones",
        "device": device_name(),
        "reference": ref,
        "sizes": asdict(size),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "torch_threads": str(torch.get_num_threads()),
        },
        "notes": [
            "s_per_item: median seconds per crop (extract: encoder forward at the crop size) and per image "
            "(gradcam: K concepts, one forward + one batched backward); vs_reference = s_per_item / the "
            "reference's; every repeat times each path of each arch in turn",
            "memory: PeakMemory around the first (warm-up, FLOP-counted) call; call_extra_rss_mb = its "
            "peak RSS minus the RSS on entry (the encoders built before it stay loaded)",
        ],
        "backbones": rows,
    }
