"""The benchmark job at its tiny size: it runs and its JSON document has every key; no timing is asserted.

The in-process sub-benchmarks (pseudo_label, cluster) run in seconds; the Ray ones (extract, bootstrap) run in a
subprocess that joins the session's Ray, with one timed repeat, and start two Ray Train runs, so they are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import suite

ROOT = Path(__file__).resolve().parents[1]


def bench_job():
    """jobs/bench.py as a module (jobs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_job", ROOT / "jobs" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_document(doc: dict, expected: list[str]) -> None:
    assert doc["schema"] == suite.SCHEMA and doc["size"] == "tiny"
    assert set(doc["benchmarks"]) == set(expected)
    for name, result in doc["benchmarks"].items():
        missing = [k for k in suite.BENCH_KEYS if k not in result]
        assert not missing, f"{name}: missing keys {missing}"
        assert result["device"].startswith(("cpu", "cuda")), result["device"]
        assert {"torch", "ray", "faiss", "timm"} <= set(result["versions"])
        assert result["sizes"] and result["timings"]
        for label, timing in result["timings"].items():
            assert positive(timing["median_s"]) and all(positive(t) for t in timing["runs_s"]), (name, label)
        assert positive(result["ratio"]), (name, result["ratio"])
        assert result["ratios"] and all(positive(v) for v in result["ratios"].values()), (name, result["ratios"])
        assert isinstance(result["meets_target"], bool) and result["target"]
        assert result["memory"], name
        for where in result["memory"].values():
            assert positive(where["driver_peak_rss_mb"]), (name, where)


def test_in_process_benchmarks_tiny(tmp_path):
    doc = json.loads(json.dumps(suite.run(["pseudo_label", "cluster"], size="tiny", workdir=tmp_path)))
    check_document(doc, ["pseudo_label", "cluster"])
    pseudo = doc["benchmarks"]["pseudo_label"]
    assert pseudo["sizes"]["ks"] == [27, 171]
    assert {f"gradcam_vs_forward_backward_k{k}" for k in (27, 171)} <= set(pseudo["ratios"])
    assert {f"per_concept_loop_speedup_k{k}" for k in (27, 171)} <= set(pseudo["ratios"])
    cluster = doc["benchmarks"]["cluster"]
    assert cluster["sizes"]["dim"] == 384 and cluster["sizes"]["parquet_parts"] > 1
    assert {"kmeans_vs_gemm_ceiling_k27", "kmeans_vs_gemm_ceiling_k171", "parquet_stage_vs_raw"} <= set(
        cluster["ratios"]
    )


@pytest.mark.slow
def test_bench_job_tiny_ray_benchmarks(tmp_path, shared_ray):
    """`python jobs/bench.py --size tiny --only extract,bootstrap --address A --out FILE`: JSON on stdout and in
    FILE."""
    out = tmp_path / "suite.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "bench.py"),
            "--size",
            "tiny",
            "--only",
            "extract,bootstrap",
            "--repeats",
            "1",
            "--address",
            shared_ray,
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    doc = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == doc
    check_document(doc, ["extract", "bootstrap"])
    extract = doc["benchmarks"]["extract"]
    assert extract["sizes"]["crops"] > 0 and extract["sizes"]["parts"] >= 2
    assert {"pipeline_steady_vs_bare", "pipeline_end_to_end_vs_bare", "fg_prior_flops_fraction"} <= set(
        extract["ratios"]
    )
    boot = doc["benchmarks"]["bootstrap"]
    assert positive(boot["rates"]["samples_per_s_workers_1"]) and positive(boot["rates"]["samples_per_s_workers_2"])
    assert positive(boot["rates"]["bare_step_samples_per_s"]) and positive(boot["ratios"]["workers_2_vs_1"])
    waits = [e["data_wait"] for e in boot["epoch_times"]["workers_2"]]  # per epoch, one fraction per worker
    assert len(waits) == 2 and all(len(w) == 2 and all(0 <= f <= 1 for f in w) for w in waits)


def test_bench_job_rejects_unknown_benchmark():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "bench.py"), "--only", "extract,nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_device_only_bench_imports_no_ray_faiss_mlflow(tmp_path):
    """`jobs/bench.py --device-only --size tiny` on CPU: every hot path timed with its FLOPs, and none of Ray,
    FAISS or MLflow in sys.modules afterwards."""
    code = (
        "import json, sys; sys.argv = ['bench', '--device-only', '--size', 'tiny', '--out', sys.argv[1]]; "
        "import runpy; runpy.run_path('jobs/bench.py', run_name='__main__'); "
        "print('LOADED', json.dumps(sorted(m for m in ('ray', 'faiss', 'mlflow') if m in sys.modules)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "d.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []"
    doc = json.loads((tmp_path / "d.json").read_text())
    assert positive(doc["peak_gemm_tflop_per_s"])
    assert {
        "gradcam_k27_32px_x2",
        "gradcam_k171_32px_x2",
        "train_step_32px_x2",
        "predict_32px_x2",
        "encoder_forward_32px_x8",
    } == set(doc["paths"])
    for name, path in doc["paths"].items():
        assert positive(path["seconds"]) and positive(path["gflop"]) and positive(path["fraction_of_peak"]), name


def test_backbones_mode_tiny_families(tmp_path):
    """`--size backbones` on the tiny member of each family: per-item extract and Grad-CAM seconds, FLOPs, peak
    memory and the ratios against the first arch (the reference, 1.0 against itself), written as JSON."""
    job = bench_job()
    archs = ["vit_tiny_test", "dinov2_tiny_test", "dinov2_reg4_tiny_test", "dinov3_tiny_test"]
    doc = job.main(
        [
            "--size",
            "backbones",
            "--archs",
            ",".join(archs),
            "--repeats",
            "1",
            "--divide",
            "4",
            "--out",
            str(tmp_path / "b.json"),
        ]
    )
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["reference"] == "vit_tiny_test" and list(doc["backbones"]) == archs and doc["sizes"]["k"] == 27
    for arch, row in doc["backbones"].items():
        assert {
            "patch",
            "dim",
            "crop_size",
            "gradcam_size",
            "prefix_tokens",
            "s_per_item",
            "vs_reference",
            "gflop_per_item",
            "gflop_vs_reference",
            "memory",
        } <= set(row), arch
        assert row["crop_size"] % row["patch"] == 0 and row["gradcam_size"] // row["patch"] == 10
        for name in ("extract", "gradcam"):
            assert positive(row["s_per_item"][name]) and positive(row["vs_reference"][name]), (arch, name)
            assert positive(row["gflop_per_item"][name]) and positive(row["memory"][name]["driver_peak_rss_mb"])
    ref = doc["backbones"]["vit_tiny_test"]
    assert ref["vs_reference"] == {"extract": 1.0, "gradcam": 1.0} and len(ref["runs_s_per_item"]["extract"]) == 1
    assert doc["backbones"]["dinov3_tiny_test"]["prefix_tokens"] == 5


def test_backbones_mode_rejects_unknown_arch():
    with pytest.raises(SystemExit) as e:
        bench_job().main(["--size", "backbones", "--archs", "vit_small_patch8,nope"])
    assert e.value.code == 2


def test_precision_mode_tiny(tmp_path):
    """`--size precision`: each precision's argmax agreement with fp32 (Grad-CAM per K, fg prior, eval labels) and
    the bank's stored terms against the fp32 maps. On a CPU tf32 is fp32 (all 1.0); fp32 terms keep every argmax."""
    doc = bench_job().main(["--size", "precision", "--precision-size", "tiny", "--out", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(json.dumps(doc))
    keys = {"gradcam_k5", "gradcam_k9", "fg_prior", "eval_labels"}
    assert set(doc["precisions"]) == {"fp32", "tf32", "bf16"} and keys | {"seconds"} == set(doc["precisions"]["bf16"])
    assert all(0 < doc["precisions"]["bf16"][k] <= 1 for k in keys)
    if doc["device"] == "cpu":
        assert all(doc["precisions"]["tf32"][k] == 1.0 for k in keys)
    assert doc["bank"]["bank_terms_float32_k5"] == doc["bank"]["bank_terms_float32_k9"] == 1.0
