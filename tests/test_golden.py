"""Golden figures of the shared synthetic run (the `e2e_run` fixture: fixed seeds, tiny random ViT, 2 epochs).

tests/golden/synthetic_run.json holds its per-epoch losses and validation mIoU (the bootstrap run's MLflow
history), evaluate's mIoU, pixel accuracy and Table 3 figures, and its results table (final and best checkpoints
with and without CRF, the linear probe); tests/figures.py says how they are compared and regenerated.
"""

import pytest
from figures import check, run_figures, table_figures


@pytest.mark.slow
def test_synthetic_run_matches_golden_figures(e2e_run):
    table = table_figures(e2e_run / "evaluate" / "metrics.json")
    check("synthetic_run", {**run_figures(e2e_run), "results_table": table})
