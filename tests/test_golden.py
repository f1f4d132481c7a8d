"""Golden figures of the shared synthetic run (the `e2e_run` fixture: fixed seeds, tiny random ViT, 2 epochs).

tests/golden/synthetic_run.json holds its per-epoch losses and validation mIoU (the bootstrap run's MLflow
history), and evaluate's mIoU, pixel accuracy and Table 3 figures. Any change to the math, the data or the seeds
moves them; regenerate after a deliberate change, with one command, and commit the file:

    TRANSFGU_REGEN_GOLDEN=1 flock /tmp/ray-tests.lock python -m pytest -q tests/test_golden.py

Tolerance: on one machine the run is bit-identical (ordered ingest, seeded generators, resumable RNG state). On
another, BLAS kernels and thread counts change the order of float sums: ~1e-7 relative per op in fp32, grown
through 4 optimizer steps and the argmax of pseudo labels. Losses are allowed 1e-3 relative (1e-4 absolute near
0), well above that drift and well below what any change of an equation, a default or a seed moves them (>= 1e-2);
mIoU-type figures, which jump by whole pixels (1/24,576 of the val pixels each) when an argmax flips, 1e-2 absolute.
"""

import json
import math
import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "synthetic_run.json"
LOSS_RTOL, LOSS_ATOL, SCORE_ATOL = 1e-3, 1e-4, 1e-2


def figures(run_dir: Path) -> dict:
    """The run's figures: per-epoch loss/* and val/miou of the bootstrap stage, evaluate's scores."""
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
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    return {
        "epochs": [epochs[s] for s in sorted(epochs)],
        "evaluate": {
            "miou": metrics["miou"],
            "pixel_accuracy": metrics["pixel_accuracy"],
            **{f"table3/{k}": v for k, v in metrics["table3"].items()},
        },
    }


@pytest.mark.slow
def test_synthetic_run_matches_golden_figures(e2e_run):
    got = figures(e2e_run)
    if os.environ.get("TRANSFGU_REGEN_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert len(got["epochs"]) == len(want["epochs"]) and [set(e) for e in got["epochs"]] == [
        set(e) for e in want["epochs"]
    ]
    for epoch, (g, w) in enumerate(zip(got["epochs"], want["epochs"])):
        for name, value in w.items():
            tol = (0, SCORE_ATOL) if name == "val/miou" else (LOSS_RTOL, LOSS_ATOL)
            assert math.isclose(g[name], value, rel_tol=tol[0], abs_tol=tol[1]), (
                f"epoch {epoch} {name}: {g[name]} vs golden {value} (regenerate: see this module's docstring)"
            )
    for name, value in want["evaluate"].items():
        assert (got["evaluate"][name] is None) == (value is None), name
        if value is not None:
            assert math.isclose(got["evaluate"][name], value, abs_tol=SCORE_ATOL), (
                f"{name}: {got['evaluate'][name]} vs golden {value} (regenerate: see this module's docstring)"
            )
