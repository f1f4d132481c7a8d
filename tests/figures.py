"""Golden figures: the exact results of seeded runs, checked in as tests/golden/<name>.json and compared here.

Any change to the math, the data or the seeds moves them; regenerate after a deliberate change, with one command
per test file, and commit the files:

    TRANSFGU_REGEN_GOLDEN=1 python -m pytest -q tests/test_golden.py   # or test_backbones_e2e.py, test_sweep.py, ...

Tolerance: on one machine the runs are bit-identical (ordered ingest, seeded generators, resumable RNG state). On
another, BLAS kernels and thread counts change the order of float sums: ~1e-7 relative per op in fp32, grown
through the optimizer steps and the argmax of pseudo labels. Losses are allowed 1e-3 relative (1e-4 absolute near
0), well above that drift and well below what any change of an equation, a default or a seed moves them (>= 1e-2);
mIoU-type figures, which jump by whole pixels (1/24,576 of the val pixels each) when an argmax flips, 1e-2 absolute.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
LOSS_RTOL, LOSS_ATOL, SCORE_ATOL = 1e-3, 1e-4, 1e-2


def run_figures(run_dir: Path) -> dict:
    """A pipeline run's figures: per-epoch loss/* and val/miou of its bootstrap stage (MLflow history), evaluate's
    mIoU, pixel accuracy and Table 3 scores."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("transfgu-dist").experiment_id])
    parent = min((r for r in runs if r.info.run_name == "run_all"), key=lambda r: r.info.start_time)
    boot = next(
        r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and r.info.run_name == "bootstrap"
    )
    names = sorted(k for k in boot.data.metrics if k.startswith("loss/") or k == "val/miou")
    epochs: dict[int, dict[str, float]] = {}
    for name in names:
        for m in client.get_metric_history(boot.info.run_id, name):
            epochs.setdefault(m.step, {})[name] = m.value
    return {"epochs": [epochs[s] for s in sorted(epochs)], "evaluate": scores(run_dir / "evaluate" / "metrics.json")}


def scores(metrics_json: Path) -> dict:
    """evaluate's mIoU, pixel accuracy and Table 3 scores from its metrics.json."""
    metrics = json.loads(metrics_json.read_text())
    return {
        "miou": metrics["miou"],
        "pixel_accuracy": metrics["pixel_accuracy"],
        **{f"table3/{k}": v for k, v in metrics["table3"].items()},
    }


def table_figures(metrics_json: Path) -> dict:
    """evaluate's results-table figures (the linear probe's among them) from its metrics.json."""
    rows = json.loads(metrics_json.read_text())["results_table"]
    return {f"{r['row']}/{k}": r[k] for r in rows for k in ("miou", "pixel_accuracy")}


def check(name: str, got: dict) -> None:
    """Compare `got` with tests/golden/<name>.json: the same keys, None where it is None, numbers within the
    tolerance of their kind (keys starting with "loss" are losses, every other number a score).
    TRANSFGU_REGEN_GOLDEN=1 writes `got` there instead and skips."""
    path = GOLDEN / f"{name}.json"
    if os.environ.get("TRANSFGU_REGEN_GOLDEN") == "1":
        path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {path}")
    _compare(got, json.loads(path.read_text()), name)


def _compare(got, want, where: str) -> None:
    hint = f"{where}: {got} vs golden {want} (regenerate: see tests/figures.py)"
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), hint
        for key in want:
            _compare(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), hint
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), hint
    elif isinstance(want, float) and not isinstance(got, bool) and isinstance(got, (int, float)):
        loss = where.rsplit(".", 1)[-1].startswith("loss")
        rtol, atol = (LOSS_RTOL, LOSS_ATOL) if loss else (0.0, SCORE_ATOL)
        assert math.isclose(got, want, rel_tol=rtol, abs_tol=atol), hint
    else:
        assert got == want, hint
