"""Results the field can compare: the results table against the scorers evaluate uses for one checkpoint, the linear
probe on features that encode the class, and several seeds' mean and sample std (the shared synthetic run)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import SMALL, job

from transfgu_dist.io.datasets import list_samples
from transfgu_dist.io.image_pool import actor_pool
from transfgu_dist.io.label_maps import IGNORE
from transfgu_dist.method.metrics import confusion_matrix, scores_from_confusion
from transfgu_dist.method.probe import LinearProbe, probe_step
from transfgu_dist.pipeline.cli import parse_args, prepare
from transfgu_dist.pipeline.scoring import Predictor, val_dataset


def test_linear_probe_reaches_miou_one_where_features_encode_the_class():
    """Patch features = a class's direction plus noise, labels at the patch grid: the trained head separates them."""
    gen = torch.Generator().manual_seed(0)
    n_classes, dim = 4, 16
    gt = torch.randint(0, n_classes, (8, 6, 6), generator=gen)
    gt[0, 0, 0] = IGNORE
    patch = torch.randn(n_classes, dim, generator=gen)[gt.clamp(max=n_classes - 1)]
    patch = patch + 0.1 * torch.randn(patch.shape, generator=gen)
    torch.manual_seed(0)
    probe = LinearProbe(dim, n_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05)
    losses = [probe_step(probe, optimizer, patch, gt, IGNORE) for _ in range(60)]
    assert losses[-1] < losses[0]
    assert probe_step(probe, optimizer, patch, torch.full_like(gt, IGNORE), IGNORE) is None  # nothing to learn
    pred = probe(patch).logits.argmax(1)
    conf = confusion_matrix(gt, pred, n_classes, n_classes, IGNORE)
    assert scores_from_confusion(conf, np.arange(n_classes)).miou == 1.0


def scorer(cfg, checkpoint: str, crf: bool) -> tuple[float, float]:
    """mIoU and pixel accuracy of one checkpoint as evaluate scores it (scoring.Predictor, eval.crf)."""
    from transfgu_dist.inference.segmenter import load_decoder

    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, crf=crf))
    ds = val_dataset(cfg, list_samples(cfg, cfg.data.val_split)).map_batches(
        Predictor,
        fn_constructor_kwargs={"cfg": cfg, "decoder": load_decoder(checkpoint, cfg), "overlay_ids": frozenset()},
        batch_size=cfg.eval.batch_size,
        **actor_pool(cfg.resources),
    )
    s = scores_from_confusion(sum(r["confusion"] for r in ds.take_all()))
    return s.miou, s.pixel_accuracy


def test_table_rows_equal_the_scorers(e2e_run, shared_ray):
    cfg = prepare(parse_args("", [f"--config={e2e_run / 'config.yaml'}"]))
    metrics = json.loads((e2e_run / "evaluate" / "metrics.json").read_text())
    table = {r["row"]: r for r in metrics["results_table"]}
    assert list(table) == ["final", "final_crf", "best", "best_crf", "linear", "linear_crf"]
    assert (table["final"]["miou"], table["final"]["pixel_accuracy"]) == (metrics["miou"], metrics["pixel_accuracy"])
    for row, checkpoint, crf in (
        ("final_crf", "final.pt", True),
        ("best", "best.pt", False),
        ("best_crf", "best.pt", True),
    ):
        assert (table[row]["miou"], table[row]["pixel_accuracy"]) == scorer(
            cfg, str(e2e_run / "bootstrap" / checkpoint), crf
        )
    assert (
        table["linear"]["protocol"].startswith("SUPERVISED")
        and table["linear"]["checkpoint"] == "evaluate/linear_probe.pt"
    )
    md = (e2e_run / "evaluate" / "results_table.md").read_text()
    assert "| 3 | authors' protocol: best epoch on val labels | bootstrap/best.pt | no |" in md
    assert "results table" in (e2e_run / "console.log").read_text()


@pytest.mark.slow
def test_two_seeds_report_mean_and_sample_std(e2e_run, jobs_join_shared_ray, tmp_path):
    """seeds=2 from bootstrap on, on the shared run's features, concepts and bank (source=)."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "seeds_run"
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    args = [f"output={out}", f"source={e2e_run}", *SMALL, "seeds=2", "train.cpus_per_worker=0.25"]
    console = job("run_all", *args, env=store)
    summary = json.loads((out / "seeds" / "metrics.json").read_text())
    assert summary["seeds"] == [2021, 2022] and "mean ± sample std" in console
    per_seed = [
        json.loads((out / "seeds" / f"seed-{s}" / "evaluate" / "metrics.json").read_text()) for s in (2021, 2022)
    ]
    assert [summary["per_seed"][str(s)] for s in (2021, 2022)] == [m["results_table"] for m in per_seed]
    assert not (out / "features").exists() and not (out / "bootstrap").exists()  # reused; bootstrap only per seed
    client = MlflowClient(store["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.info.run_name == "seeds")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["seed-2021", "seed-2022"]
    for i, row in enumerate(summary["aggregate"]):
        for k in ("miou", "pixel_accuracy"):
            values = [m["results_table"][i][k] for m in per_seed]
            assert row[k]["mean"] == np.mean(values) and row[k]["std"] == np.std(values, ddof=1)
            assert parent.data.metrics[f"table/{row['row']}/{k}/mean"] == row[k]["mean"]
            assert [children[f"seed-{s}"].data.metrics[f"table/{row['row']}/{k}"] for s in (2021, 2022)] == values
