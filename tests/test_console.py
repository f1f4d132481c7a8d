"""The demo's console: short, the project's own lines, ending in the summary (from the shared e2e run)."""
import pytest


@pytest.mark.slow
def test_demo_console_is_short_and_ends_in_the_summary(e2e_run):
    lines = (e2e_run / "console.log").read_text().strip().splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert lines[-1].startswith("MLflow: mlflow ui") and any(line.startswith("mIoU ") for line in lines[-4:])
    assert not any("(MapWorker" in line or "Running Dataset" in line for line in lines), "\n".join(lines)
