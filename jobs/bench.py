"""Benchmarks of the hot paths against their ceilings (extract, pseudo_label, cluster, bootstrap); prints JSON.

    python jobs/bench.py [--only extract,pseudo_label,cluster,bootstrap] [--size tiny|small|full] [--out FILE]
    python jobs/bench.py --size scale [--scale-n 500,2000,8000]   # pipeline overheads vs image count
    python jobs/bench.py --device-only [--size tiny|full]   # model hot paths only: no Ray, FAISS or MLflow imported
    python jobs/bench.py --size backbones [--archs A,B] [--divide N]  # each backbone vs DINO ViT-S/8; no Ray
    python jobs/bench.py --size elastic   # extract and bootstrap throughput with 0 and 1 node lost, fake 3-node Ray
    python jobs/bench.py --size precision [--precision-size tiny|small]  # bf16 / tf32 agreement with fp32; no Ray

Progress goes to stderr; stdout carries only the JSON document (also written to --out when given).
See benchmarks/ (suite.py and one module per benchmark) for what each figure means and docs/performance.md for
measured numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ sits beside the package

SIZES, DEVICE_SIZES = ("tiny", "small", "full", "scale", "backbones", "elastic", "precision"), ("tiny", "full")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", help="comma-separated sub-benchmarks (default: all of extract, pseudo_label, cluster, bootstrap)"
    )
    parser.add_argument("--size", choices=SIZES, help="problem sizes (default: small; --device-only: full)")
    parser.add_argument("--scale-n", default="500,2000", help="--size scale: image counts (default: 500,2000)")
    parser.add_argument(
        "--archs",
        help="--size backbones: encoder.arch names, the first one the reference "
        "(default: DINO ViT-S/8, then DINOv2, DINOv2-reg4 and DINOv3 ViT-S and ViT-B)",
    )
    parser.add_argument(
        "--divide",
        type=int,
        default=1,
        help="--size backbones: divide every preset side by this (a 40 x 40 grid becomes 40/N)",
    )
    parser.add_argument(
        "--precision-size",
        choices=("tiny", "small"),
        default="small",
        help="--size precision: the tiny test encoder, or ViT-S/8 at 160 px with K = 27 and 171 (default)",
    )
    parser.add_argument(
        "--device-only",
        action="store_true",
        help="the model hot paths on one device, importing neither Ray, FAISS nor MLflow",
    )
    parser.add_argument("--repeats", type=int, help="timed repeats of in-process measurements (default: per size)")
    parser.add_argument("--workdir", help="scratch folder for data and stage outputs (default: a temporary one)")
    parser.add_argument("--address", help="Ray cluster address (default: a private local Ray on 127.0.0.1)")
    parser.add_argument(
        "--worker-threads",
        type=int,
        help="experiment: OMP_NUM_THREADS for the local Ray's workers (default: Ray's, the task's CPUs)",
    )
    parser.add_argument("--out", help="also write the JSON document to this file")
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.device_only:
        if args.size not in (None, *DEVICE_SIZES):
            parser.error(f"--device-only runs at --size {' or '.join(DEVICE_SIZES)}, got {args.size}")
        from benchmarks.device import run_device

        return _emit(run_device(args.size or "full", log), args.out)
    if args.size == "precision":
        from benchmarks.precision import run_precision

        with contextlib.redirect_stdout(sys.stderr):
            doc = run_precision(args.precision_size, log)
        return _emit(doc, args.out)
    if args.size == "backbones":
        from benchmarks.backbones import BACKBONES, run_backbones
        from transfgu_dist.config import ARCHS

        archs = [a.strip() for a in args.archs.split(",") if a.strip()] if args.archs else list(BACKBONES)
        if set(archs) - set(ARCHS):
            parser.error(f"unknown arch(s) {', '.join(sorted(set(archs) - set(ARCHS)))} (known: {', '.join(ARCHS)})")
        with contextlib.redirect_stdout(sys.stderr):
            doc = run_backbones(archs, args.repeats, args.divide, log)
        return _emit(doc, args.out)
    if args.size == "elastic":
        import tempfile
        from pathlib import Path

        from benchmarks.elastic import run_elastic

        with contextlib.redirect_stdout(sys.stderr):
            doc = run_elastic(Path(args.workdir or tempfile.mkdtemp()), log)
        return _emit(doc, args.out)
    if args.size == "scale":
        import tempfile
        from pathlib import Path

        from benchmarks.scale import run_scale

        with contextlib.redirect_stdout(sys.stderr):
            doc = run_scale([int(n) for n in args.scale_n.split(",")], Path(args.workdir or tempfile.mkdtemp()), log)
        return _emit(doc, args.out)
    from benchmarks import suite

    only = [name.strip() for name in (args.only or ",".join(suite.BENCHMARKS)).split(",") if name.strip()]
    unknown = sorted(set(only) - set(suite.BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)} (known: {', '.join(suite.BENCHMARKS)})")
    with contextlib.redirect_stdout(sys.stderr):  # libraries' chatter must not corrupt the JSON on stdout
        doc = suite.run(
            only, args.size or "small", args.repeats, args.workdir, args.address, log, args.worker_threads, args.out
        )
    print(json.dumps(doc, indent=2))
    if suite.failed(doc):
        log(f"failed: {', '.join(suite.failed(doc))}")
        sys.exit(1)
    return doc


def _emit(doc: dict, out: str | None) -> dict:
    """The JSON document on stdout, and in `out` when given."""
    print(json.dumps(doc, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(doc, f, indent=2)
    return doc


if __name__ == "__main__":
    main()
