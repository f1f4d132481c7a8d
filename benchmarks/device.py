"""Model hot paths on one device, with no Ray, FAISS or MLflow imported (`jobs/bench.py --device-only`).

For a GPU node that has torch, timm, numpy and pyarrow but not Ray: the encoder forward at the crop size (Eq. 3),
batched Grad-CAM at K = 27 and 171 (Eqs 5-8), one bootstrap training step of round 0 (Eqs 9, 14-16) and prediction
(bilinear upsampling and argmax), each timed with CUDA synchronisation under bf16 autocast (CPU: fp32), its FLOPs
counted by torch's flop counter, and reported as achieved TFLOP/s against the device's bf16 peak as one measured
square GEMM gives it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from transfgu_dist.config import DecoderConfig, EncoderConfig, PseudoLabelConfig
from transfgu_dist.io.weights import build_encoder
from transfgu_dist.method.decoder import MaskTransformer
from transfgu_dist.method.gradcam import gradcam
from transfgu_dist.method.losses import cross_entropy, diversity_loss, total_loss, uncertainty_loss


@dataclass(frozen=True)
class DeviceSize:
    arch: str
    crop_size: int  # encoder forward on crops (extract)
    crop_batch: int
    cam_size: int  # Grad-CAM images (pseudo_label)
    cam_batch: int
    train_size: int  # student training crops (bootstrap) and prediction images (evaluate)
    train_batch: int
    gemm: int  # side of the square GEMM that measures the peak
    repeats: int
    ks: tuple[int, ...] = (27, 171)


DEVICE_SIZES = {
    "tiny": DeviceSize("vit_tiny_test", 32, 8, 32, 2, 32, 2, gemm=256, repeats=2),
    "full": DeviceSize("vit_small_patch8", 320, 64, 320, 8, 160, 16, gemm=8192, repeats=5),
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn: Callable[[], Any], dev: torch.device, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs after one warm-up, synchronised on CUDA."""
    fn()
    runs = []
    for _ in range(repeats):
        _sync(dev)
        start = time.perf_counter()
        fn()
        _sync(dev)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def _flops(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def run_device(size: str = "full", log: Callable[[str], None] = print) -> dict[str, Any]:
    s = DEVICE_SIZES[size]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dev)  # noqa: E731
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a, b = rand(s.gemm, s.gemm).to(dtype), rand(s.gemm, s.gemm).to(dtype)
    peak = 2 * s.gemm**3 / _time(lambda: a @ b, dev, s.repeats) / 1e12

    encoder = build_encoder(EncoderConfig(arch=s.arch, weights="random")).to(dev)
    crops, cam_images, train_images = (
        rand(s.crop_batch, 3, s.crop_size, s.crop_size),
        rand(s.cam_batch, 3, s.cam_size, s.cam_size),
        rand(s.train_batch, 3, s.train_size, s.train_size),
    )
    k = s.ks[0]
    decoder = MaskTransformer(encoder.dim, k, DecoderConfig()).to(dev)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
    grid = s.train_size // encoder.patch_size
    labels = torch.randint(0, k, (s.train_batch, grid, grid), generator=gen).to(dev)

    def encode() -> None:
        with torch.no_grad(), torch.autocast(**amp):
            encoder(crops, with_patch=False)

    def train_step() -> None:
        """Round 0: frozen encoder, student decoder, L_peer = CE (Eq. 9) + diversity + uncertainty (Eq. 16)."""
        with torch.autocast(**amp):
            with torch.no_grad():
                patch = encoder(train_images).patch
            out = decoder(patch)
            terms = total_loss(
                cross_entropy(out.logits, labels),
                diversity_loss(out.class_emb, "reference"),
                uncertainty_loss(out.logits),
                1.0,
                0.3,
            )
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()

    def predict() -> None:
        with torch.no_grad(), torch.autocast(**amp):
            logits = decoder(encoder(train_images).patch).logits
        F.interpolate(logits.float(), size=train_images.shape[-2:], mode="bilinear").argmax(1)

    paths = {
        f"encoder_forward_{s.crop_size}px_x{s.crop_batch}": encode,
        f"train_step_{s.train_size}px_x{s.train_batch}": train_step,
        f"predict_{s.train_size}px_x{s.train_batch}": predict,
    }
    cam_cfg = PseudoLabelConfig(image_size=(s.cam_size, s.cam_size), batch_size=s.cam_batch)
    for k in s.ks:
        concepts = rand(k, encoder.dim)
        paths[f"gradcam_k{k}_{s.cam_size}px_x{s.cam_batch}"] = lambda c=concepts: _autocast_call(
            amp, lambda: gradcam(encoder, cam_images, c, cam_cfg)
        )
    results = {}
    for name, fn in paths.items():
        seconds, flops = _time(fn, dev, s.repeats), _flops(fn)
        tflops = flops / seconds / 1e12
        results[name] = {
            "seconds": round(seconds, 5),
            "gflop": round(flops / 1e9, 3),
            "tflop_per_s": round(tflops, 4),
            "fraction_of_peak": round(tflops / peak, 4),
        }
        log(f"{name}: {seconds * 1e3:.1f} ms, {tflops:.3f} TFLOP/s = {tflops / peak:.1%} of the measured peak")
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "size": size,
        "sizes": asdict(s),
        "peak_gemm_tflop_per_s": round(peak, 4),
        "peak_dtype": str(dtype).split(".")[-1],
        "paths": results,
    }


def _autocast_call(amp: dict, fn: Callable[[], Any]) -> Any:
    with torch.autocast(**amp):
        return fn()
