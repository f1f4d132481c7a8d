"""The encoder benchmarks: `extract` (the Ray Data crop extraction against the bare encoder forward, Eq. 3) and
`pseudo_label` (batched Grad-CAM against one forward + one backward, Eqs 5-8)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.env import (
    bench_config,
    bench_result,
    measure,
    measure_interleaved,
    sig,
    steady_rate,
    torch_device,
    torch_module,
    torch_threads,
    write_images,
)
from benchmarks.memory import PeakMemory


@dataclass(frozen=True)
class ExtractSize:
    arch: str
    images: int
    image_size: int
    crop_size: int
    batch_size: int
    images_per_task: int


@dataclass(frozen=True)
class PseudoSize:
    arch: str
    batch_size: int
    image_size: int
    ks: tuple[int, ...] = (27, 171)


def encoder_flops(arch: str, side: int) -> int:
    """FLOPs of one `encoder(x, with_patch=False)` on a single side x side image (torch's flop counter)."""
    torch = torch_module()
    from torch.utils.flop_counter import FlopCounterMode

    from transfgu_dist.config import EncoderConfig
    from transfgu_dist.io.weights import build_encoder

    encoder = build_encoder(EncoderConfig(arch=arch, weights="random"))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder(torch.zeros(1, 3, side, side), with_patch=False)
    return int(counter.get_total_flops())


def bench_extract(size: ExtractSize, workdir: Path, repeats: int) -> dict[str, Any]:
    import pyarrow.parquet as pq

    torch = torch_module()
    from transfgu_dist.io.weights import build_encoder
    from transfgu_dist.method.precision import autocast
    from transfgu_dist.pipeline import contract
    from transfgu_dist.pipeline.stages.extract import run_extract

    overrides = [
        f"encoder.arch={size.arch}",
        f"crops.image_size=[{size.image_size}, {size.image_size}]",
        f"crops.crop_size={size.crop_size}",
        f"crops.batch_size={size.batch_size}",
        f"crops.images_per_task={size.images_per_task}",
        f"crops.images_per_part={size.images_per_task}",
        f"data.synthetic_train={size.images}",
        f"data.limit={size.images}",
    ]
    write_images(workdir / "data", size.images, size.image_size)
    # warm-up: one part, so the timed run finds Ray's worker processes started and torch imported
    run_extract(bench_config(workdir, "extract_warmup", [*overrides[:-1], f"data.limit={size.images_per_task}"]))
    cfg = bench_config(workdir, "extract", overrides)

    # the ceiling: the bare encoder forward on the same device, crop size and batch size, measured before and
    # after the pipeline run (medians over both) so that drifting load on shared cores hits both alike
    dev = torch_device()
    encoder = build_encoder(cfg.encoder).to(dev)
    crops_t = torch.randn(size.batch_size, 3, size.crop_size, size.crop_size, device=dev)

    def bare() -> None:
        with torch.no_grad(), autocast(dev, cfg.crops.precision):
            encoder(crops_t, with_patch=False)

    def bare_1_thread() -> None:
        with torch_threads(1):
            bare()

    fns = {"bare_forward_batch": bare}
    notes = []
    if dev.type == "cpu" and torch.get_num_threads() > 1:
        # what one Ray actor with num_cpus=1 gets: Ray sets its OMP_NUM_THREADS (torch threads) to 1
        fns["bare_forward_batch_1_thread"] = bare_1_thread
        notes.append(
            "CPU: Ray gives the extract actor (num_cpus=1) OMP_NUM_THREADS=1 unless the environment sets "
            "it; bare_crops_per_s uses all cores of this process, bare_crops_per_s_1_thread one"
        )
    before = measure_interleaved(fns, repeats)
    with PeakMemory() as bare_mem:
        bare()
    with PeakMemory() as mem:
        start = time.perf_counter()
        report = run_extract(cfg)
        wall = time.perf_counter() - start
    after = measure_interleaved(fns, repeats, warmup=0)
    part_files = sorted(Path(contract.output(cfg, "extract").uri).glob("part-*.parquet"))
    crops = sum(pq.read_metadata(p).num_rows for p in part_files)
    steady, steady_crops, span = steady_rate(part_files, lambda p: pq.read_metadata(p).num_rows)
    timings = {
        "pipeline_wall": {"median_s": round(wall, 4), "runs_s": [round(wall, 4)]},
        "pipeline_steady_span": {"median_s": round(span, 4), "runs_s": [round(span, 4)]},
    }
    for name in fns:
        runs = before[name]["runs_s"] + after[name]["runs_s"]
        timings[name] = {"median_s": statistics.median(runs), "runs_s": runs}
    bare_rate = size.batch_size / timings["bare_forward_batch"]["median_s"]
    rates = {
        "pipeline_crops_per_s": sig(crops / wall),
        "bare_crops_per_s": sig(bare_rate),
        "pipeline_steady_crops_per_s": sig(steady) if steady else None,
    }
    bare1_rate = None
    if "bare_forward_batch_1_thread" in timings:
        bare1_rate = size.batch_size / timings["bare_forward_batch_1_thread"]["median_s"]
        rates["bare_crops_per_s_1_thread"] = sig(bare1_rate)
    # the fg-prior forward of every full image, as a fraction of the crop forwards' FLOPs
    flops_image, flops_crop = encoder_flops(size.arch, size.image_size), encoder_flops(size.arch, size.crop_size)
    prior_fraction = report.processed * flops_image / max(crops * flops_crop, 1)
    headline = (steady or crops / wall) / bare_rate
    ratios = {
        "pipeline_steady_vs_bare": steady / bare_rate if steady else None,
        "pipeline_end_to_end_vs_bare": crops / wall / bare_rate,
        "pipeline_steady_vs_bare_with_prior": steady * (1 + prior_fraction) / bare_rate if steady else None,
        "pipeline_steady_vs_bare_1_thread": steady / bare1_rate if steady and bare1_rate else None,
        "fg_prior_flops_fraction": prior_fraction,
    }
    sizes = {
        **dataclasses.asdict(size),
        "crops": crops,
        "crops_per_image": sig(crops / max(report.processed, 1)),
        "parts": len(part_files),
        "steady_crops": steady_crops,
        "gflops_per_crop": sig(flops_crop / 1e9),
        "gflops_per_image_prior": sig(flops_image / 1e9),
    }
    notes.append(
        "steady = crops of parts 2..n / (mtime of last part - mtime of first part): Ray start-up, actor "
        "construction and the first batch excluded; end_to_end = all crops / run_extract wall time"
    )
    return bench_result(
        sizes,
        timings,
        rates,
        ratios,
        headline,
        ">= 0.9",
        headline >= 0.9,
        {"pipeline": mem.result, "bare_forward": bare_mem.result},
        notes,
    )


def bench_pseudo_label(size: PseudoSize, repeats: int) -> dict[str, Any]:
    torch = torch_module()
    from transfgu_dist.config import EncoderConfig, PseudoLabelConfig
    from transfgu_dist.io.weights import build_encoder
    from transfgu_dist.method.gradcam import concept_similarity, gradcam, response_maps
    from transfgu_dist.method.precision import autocast

    dev = torch_device()
    encoder = build_encoder(EncoderConfig(arch=size.arch, weights="random")).to(dev)
    cfg = PseudoLabelConfig(
        image_size=(size.image_size, size.image_size), batch_size=size.batch_size, loss_scale=1 / size.batch_size
    )
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(size.batch_size, 3, size.image_size, size.image_size, generator=gen).to(dev)
    timings, rates, ratios, memory = {}, {}, {}, {}

    def forward() -> None:
        with torch.no_grad(), autocast(dev, cfg.precision):
            encoder(images, with_patch=False)

    timings["forward"] = measure(forward, repeats)
    for k in size.ks:
        concepts = torch.randn(k, encoder.dim, generator=gen).to(dev)

        def batched() -> None:
            with autocast(dev, cfg.precision):
                gradcam(encoder, images, concepts, cfg)

        def forward_backward() -> None:
            """One forward and one backward: a single concept's loss back to A_L^cls."""
            with autocast(dev, cfg.precision):
                out = encoder(images, with_patch=False, attn_grad=True)
                loss = cfg.loss_scale * (
                    1 - concept_similarity(out.cls, concepts[:1].to(out.cls.dtype), cfg.similarity)
                )
                torch.autograd.grad(loss.sum(), out.cls_attn)

        def per_concept() -> None:
            """One forward, then K backward passes (one per concept), as a loop over concepts does it."""
            with autocast(dev, cfg.precision):
                out = encoder(images, with_patch=False, attn_grad=True)
                loss = cfg.loss_scale * (1 - concept_similarity(out.cls, concepts.to(out.cls.dtype), cfg.similarity))
                grads = [
                    torch.autograd.grad(loss[:, i].sum(), out.cls_attn, retain_graph=i < k - 1)[0] for i in range(k)
                ]
                grad = torch.stack(grads, 1)[..., out.n_prefix :].mean(2).unflatten(2, out.grid)
                response_maps(out.attn.detach(), grad, cfg)

        with PeakMemory() as mem:
            batched()
        memory[f"gradcam_k{k}"] = mem.result
        pair = measure_interleaved({"gradcam": batched, "forward_backward": forward_backward}, repeats)
        timings[f"gradcam_k{k}"], timings[f"forward_backward_k{k}"] = pair["gradcam"], pair["forward_backward"]
        timings[f"per_concept_loop_k{k}"] = measure(per_concept, max(1, repeats // 2), warmup=0)  # warm already
        g = timings[f"gradcam_k{k}"]["median_s"]
        ratios[f"gradcam_vs_forward_backward_k{k}"] = g / timings[f"forward_backward_k{k}"]["median_s"]
        ratios[f"per_concept_loop_speedup_k{k}"] = timings[f"per_concept_loop_k{k}"]["median_s"] / g
        ratios[f"gradcam_vs_forward_k{k}"] = g / timings["forward"]["median_s"]
        rates[f"gradcam_images_per_s_k{k}"] = sig(size.batch_size / g)
    headline = max(ratios[f"gradcam_vs_forward_backward_k{k}"] for k in size.ks)
    notes = [
        "ratio = worst over K of gradcam / (forward + one backward of one concept's loss to A_L^cls); "
        "per_concept_loop = one forward + K backward passes; speedup = loop / gradcam"
    ]
    return bench_result(
        {**dataclasses.asdict(size), "dim": encoder.dim},
        timings,
        rates,
        ratios,
        headline,
        "<= 3",
        headline <= 3,
        memory,
        notes,
    )
