"""Evaluation stage on a real local Ray (the session's): a seeded random decoder scored on tiny synthetic scenes."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
import torch
from figures import check
from PIL import Image

from transfgu_dist.config import ARCHS, Config, load_config
from transfgu_dist.inference.segmenter import CheckpointError, load_decoder
from transfgu_dist.io import synthetic
from transfgu_dist.method.decoder import MaskTransformer
from transfgu_dist.pipeline.stages import evaluate
from transfgu_dist.pipeline.stages.evaluate import class_names, run_evaluate

SIZE = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Six synthetic val scenes plus one unreadable image (sorted last, so not an overlay)."""
    root = tmp_path_factory.mktemp("data")
    synthetic.write_dataset(root, n_train=0, n_val=6, size=(SIZE, SIZE))
    (root / "images" / "val" / "zzz_broken.png").write_bytes(b"not a png")
    return root


def make_config(output: Path, data: Path, *extra: str) -> Config:
    return load_config(
        overrides=[
            f"output={output}",
            f"data.root={data}",
            f"eval.image_size=[{SIZE}, {SIZE}]",
            "eval.batch_size=4",
            "eval.n_overlays=2",
            "encoder.arch=vit_tiny_test",
            "encoder.weights=random",
            *extra,
        ]
    )


def save_checkpoint(cfg: Config, path: Path, **override) -> str:
    """A randomly initialised decoder (seed 0) in the bootstrap stage's checkpoint format."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        decoder = MaskTransformer(ARCHS[cfg.encoder.arch][1], cfg.n_outputs, cfg.decoder)
    ckpt = {
        "decoder": decoder.state_dict(),
        "n_outputs": cfg.n_outputs,
        "encoder": dataclasses.asdict(cfg.encoder),
        "round": 0,
        **override,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return str(path)


def open_png(path: Path) -> Image.Image:
    img = Image.open(io.BytesIO(path.read_bytes()))
    img.load()
    return img


def test_run_evaluate_writes_and_commits(shared_ray, data_dir, tmp_path, monkeypatch):
    cfg = make_config(tmp_path / "run", data_dir)
    save_checkpoint(cfg, tmp_path / "run" / "bootstrap" / "final.pt")
    result = run_evaluate(cfg)
    metrics = result.manifest["metrics"]
    assert result.processed == 6 and result.metrics["miou"] == metrics["miou"]

    out = tmp_path / "run" / "evaluate"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["n_images"] == 6 and metrics["bad_images"] == ["zzz_broken"] and metrics["n_bad_images"] == 1
    # listed like the other stages' skipped images: the file path and the reason
    bad_line = str(data_dir / "images" / "val" / "zzz_broken.png") + "\timage or label unreadable"
    assert (out / "bad_images.txt").read_text() == bad_line
    assert list(metrics["per_class_iou"]) == list(synthetic.CLASS_NAMES)
    assert len(metrics["matching"]) == cfg.n_outputs
    assert metrics["checkpoint"] == "bootstrap/final.pt"  # relative to the output: a moved one scores its own
    assert open_png(out / "confusion.png").format == "PNG" and open_png(out / "per_class_iou.png").format == "PNG"
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["000000.png", "000001.png"]
    overlay = open_png(out / "overlays" / "000000.png")  # titled image | GT | prediction panels with a legend
    assert overlay.height >= 320 and overlay.width >= 3 * 320
    manifest = json.loads((out / "_SUCCESS.json").read_text())
    assert manifest["metrics"] == metrics and "metrics.json" in manifest["parts"]
    assert metrics["table3"] == {"pseudo_labels": None, "round0_student": None, "student": metrics["miou"]}  # no bank
    # no best.pt, no probe: the label-free rows only, the first one evaluate's own figures
    assert [r["row"] for r in metrics["results_table"]] == ["final", "final_crf"]
    first = metrics["results_table"][0]
    assert (first["miou"], first["pixel_accuracy"]) == (metrics["miou"], metrics["pixel_accuracy"])
    assert result.metrics["table/final/miou"] == metrics["miou"]
    assert "| 1 | label-free: final checkpoint" in (out / "results_table.md").read_text()

    def recompute(*args, **kwargs):
        raise AssertionError("a committed stage must not be recomputed")

    monkeypatch.setattr(evaluate, "list_samples", recompute)
    monkeypatch.setattr(evaluate, "load_decoder", recompute)
    again = run_evaluate(cfg)
    assert again.manifest["metrics"] == metrics and again.processed == 0
    check("evaluate_random_decoder", {k: metrics[k] for k in ("miou", "pixel_accuracy", "per_class_iou")})


@pytest.mark.parametrize(
    "bad",
    [
        lambda cfg, ckpt: ckpt["decoder"],  # a plain state dict
        lambda cfg, ckpt: {**ckpt, "n_outputs": cfg.n_outputs + 1},  # wrong number of clusters
        lambda cfg, ckpt: {**ckpt, "encoder": {"arch": "vit_small_patch8"}},  # trained on another encoder
    ],
)
def test_wrong_checkpoint_names_the_file(tmp_path, data_dir, bad):
    cfg = make_config(tmp_path / "run", data_dir)
    good = save_checkpoint(cfg, tmp_path / "good.pt")
    path = tmp_path / "wrong.pt"
    torch.save(bad(cfg, torch.load(good, weights_only=True)), path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_decoder(str(path), cfg)
    with pytest.raises(CheckpointError, match="expected a bootstrap checkpoint"):
        run_evaluate(cfg, str(path))  # fails on the driver, before any Ray work


def test_decoder_weights_must_fit(tmp_path, data_dir):
    cfg = make_config(tmp_path, data_dir)
    path = save_checkpoint(make_config(tmp_path, data_dir, "decoder.n_layers=1"), tmp_path / "shallow.pt")
    with pytest.raises(CheckpointError, match="decoder weights do not fit"):
        load_decoder(path, cfg)


def test_class_names(tmp_path):
    assert class_names(load_config()) == list(synthetic.CLASS_NAMES)
    folder = load_config(overrides=["data.layout=folder", f"data.root={tmp_path}", "data.n_classes=2"])
    assert class_names(folder) == ["class_0", "class_1"]
    (tmp_path / "classes.txt").write_text("sky\ngrass\n")
    assert class_names(folder) == ["sky", "grass"]
    (tmp_path / "classes.txt").write_text("sky\n")
    with pytest.raises(ValueError, match="1 class names, but data.n_classes = 2"):
        class_names(folder)


@pytest.mark.slow
def test_a_class_absent_from_gt_and_prediction_logs_no_nan_and_reruns(tmp_path):
    """A decoder of zeros predicts cluster 0 everywhere; class 0 is relabelled `ignore`, so classes absent from
    the ground truth and the matched prediction have no IoU: evaluate and its rerun exit 0, MLflow holds no NaN."""
    import numpy as np
    from conftest import job
    from mlflow.tracking import MlflowClient

    data = tmp_path / "data"
    synthetic.write_dataset(data, n_train=0, n_val=4, size=(SIZE, SIZE))
    gts = []
    for f in sorted((data / "labels" / "val").iterdir()):
        gt = np.array(Image.open(f))
        gt[gt == 0] = 255
        Image.fromarray(gt).save(f)
        gts.append(gt)
    cfg = make_config(tmp_path / "run", data)
    decoder = MaskTransformer(ARCHS[cfg.encoder.arch][1], cfg.n_outputs, cfg.decoder)
    for p in decoder.parameters():
        torch.nn.init.zeros_(p)
    save_checkpoint(cfg, tmp_path / "run" / "bootstrap" / "final.pt", decoder=decoder.state_dict())
    args = [f"output={tmp_path / 'run'}", f"data.root={data}", f"eval.image_size=[{SIZE}, {SIZE}]"]
    args += ["encoder.arch=vit_tiny_test", "encoder.weights=random", "eval.n_overlays=1"]
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"}
    first, again = job("evaluate", *args, env=store), job("evaluate", *args, env=store)
    counts = np.bincount(np.concatenate([g.ravel() for g in gts]), minlength=256)[: cfg.data.n_classes]
    present = int((counts > 0).sum())  # cluster 0 takes the largest class; the other present classes score 0
    expected = counts.max() / counts.sum() / present
    metrics = json.loads((tmp_path / "run" / "evaluate" / "metrics.json").read_text())
    assert present < cfg.data.n_classes and metrics["miou"] == pytest.approx(expected, rel=1e-9)
    assert [v is None for v in metrics["per_class_iou"].values()] == list(counts == 0)
    assert f"the {present} of {cfg.data.n_classes} classes present" in metrics["miou_over"]
    assert f"mIoU {100 * expected:.2f}" in first and f"mIoU {100 * expected:.2f}" in again
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    logged = [(r.info.run_name, k, v) for r in runs for k, v in r.data.metrics.items()]
    assert len(runs) == 4 and all(np.isfinite(v) for _, _, v in logged), logged
    iou = {k for name, k, _ in logged if name == "evaluate" and k.startswith("iou/")}
    assert iou == {f"iou/{c}" for c, n in zip(synthetic.CLASS_NAMES, counts) if n}
