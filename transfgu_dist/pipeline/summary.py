"""The summary a run ends with: stage wall times, the validation and Table 3 lines, the evaluation (mIoU and the
results table, or for a label-free run where its cluster description is), the seeds' mean ± std table, the outputs
and the MLflow model."""

from __future__ import annotations

from typing import Any

from transfgu_dist.config import Config
from transfgu_dist.io import storage
from transfgu_dist.pipeline import tracking
from transfgu_dist.pipeline.contract import StageResult
from transfgu_dist.pipeline.results_table import markdown_rows


def print_summary(
    cfg: Config,
    results: dict[str, StageResult],
    timings: dict[str, float],
    summary: dict[str, Any],
    model_uri: str | None,
    seeds: dict[str, Any] | None = None,
) -> None:
    print("\nstage wall times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    if "best/val/miou" in summary:
        by = "mIoU + pixel accuracy" if cfg.train.best_by == "miou_plus_acc" else "mIoU"
        print(
            f"bootstrap val mIoU: best {100 * summary['best/val/miou']:.2f} (global epoch "
            f"{summary['best/global_epoch']:.0f}, best by {by}; the reference protocol reports this epoch: score "
            f"bootstrap/best.pt with `jobs/evaluate.py eval.checkpoint=best`), "
            f"last {100 * summary['last/val/miou']:.2f}"
        )
    if "evaluate" in results:
        m, folder = results["evaluate"].manifest["metrics"], results["evaluate"].uri
        if "table3" in m:
            from transfgu_dist.pipeline.table3 import table3_line

            print(table3_line(m["table3"]))
        bad = (
            f"; {m['n_bad_images']} unreadable, not scored: {storage.join(folder, 'bad_images.txt')}"
            if m.get("n_bad_images")
            else ""
        )
        if not m.get("scored", True):
            print(
                f"no labels: not scored ({m['n_images']} images{bad}, {m['checkpoint']}); cluster sizes and pixel "
                f"shares: {storage.join(folder, 'metrics.json')}; a contact sheet per cluster: "
                f"{storage.join(folder, 'clusters')} (name the clusters with jobs/predict.py names=FILE)"
            )
        else:
            if m.get("results_table"):
                print(f"results table ({storage.join(folder, 'results_table.md')}):")
                print("\n".join(markdown_rows(m["results_table"])))
            miou = f"{100 * m['miou']:.2f}" if m["miou"] is not None else "n/a"
            print(
                f"mIoU {miou}  pixel accuracy {100 * m['pixel_accuracy']:.2f}  "
                f"({m['n_images']} val images{bad}, {m['checkpoint']})"
            )
    if seeds:
        table = storage.join(cfg.output, "seeds", "results_table.md")
        print(f"seeds {', '.join(map(str, seeds['seeds']))} (train.seed; each under {cfg.output}/seeds): {table}")
        print(f"mean ± sample std over {len(seeds['seeds'])} seeds:")
        print("\n".join(markdown_rows(seeds["aggregate"])))
    print(f"outputs: {cfg.output}" + (f"\nMLflow model: {model_uri}" if model_uri else ""))
    print(f"MLflow: mlflow ui --backend-store-uri {tracking.tracking_uri(cfg)}")
