"""A folder of unlabeled images end to end: run_all with data.layout=folder, then predict and export naming the
clusters; the stages, predict, the Python API, the MLflow pyfunc and the export give the same labels."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, job
from PIL import Image

from transfgu_dist.inference.segmenter import Segmenter, predict
from transfgu_dist.io import synthetic
from transfgu_dist.io.image_pool import images_to_device, load_images
from transfgu_dist.pipeline.cli import parse_args, prepare

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("jobs_join_shared_ray")]
NAMES = "cluster,name\n0,sky\n3,person\n"
EXTRA = {"gray16": (48, 80), "alpha": (40, 56)}  # a 16-bit grayscale PNG and an RGBA PNG: id -> (H, W)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 synthetic scenes as plain photos, a 16-bit PNG, an RGBA PNG and a corrupt file; no labels."""
    root = tmp_path_factory.mktemp("scenes")
    synthetic.write_dataset(root, n_train=12, n_val=0, size=(64, 64), seed=5)
    folder = tmp_path_factory.mktemp("photos")
    for f in (root / "images" / "train").iterdir():
        shutil.copy(f, folder / f.name)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 65535, EXTRA["gray16"], np.uint16)).save(folder / "gray16.png")
    Image.fromarray(rng.integers(0, 255, (*EXTRA["alpha"], 4), np.uint8), "RGBA").save(folder / "alpha.png")
    (folder / "corrupt.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.fixture(scope="module")
def applied(photos, tmp_path_factory) -> dict:
    """run_all on the folder, then predict and export with names= (each as a user runs it)."""
    out = tmp_path_factory.mktemp("folder_run")
    names = out / "names.csv"
    names.write_text(NAMES)
    run = job("run_all", f"output={out}", "data.layout=folder", f"data.root={photos}", *SMALL)
    pred = job("predict", f"run={out}", f"input={photos}", f"output={out / 'predicted'}", f"names={names}")
    export = job("export", f"run={out}", f"output={out / 'segmenter.pt'}", f"names={names}")
    for name, console in (("run_all", run), ("predict", pred), ("export", export)):
        (out / f"{name}.console.log").write_text(console)
    return {"out": out, "run": run, "predict": pred, "export": export}


def line(console: str, prefix: str) -> str:
    return next(x for x in console.splitlines() if x.startswith(prefix))


def use_store(monkeypatch: pytest.MonkeyPatch, out: Path) -> None:
    """MLflow at the run's store in this process; mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, which later
    jobs would inherit: monkeypatch restores it."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")


def test_folder_run_is_described_not_scored_and_its_model_is_on_the_parent_run(applied, photos, monkeypatch):
    import mlflow

    out, console = applied["out"], applied["run"]
    assert "no labels: not scored (14 images; 1 unreadable" in line(console, "no labels: not scored")
    assert "val mIoU" not in console and not (out / "bootstrap" / "best.pt").exists()  # no label-free best rule
    assert (out / "bootstrap" / "final.pt").exists()
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics["scored"] is False and metrics["n_images"] == 14 and "miou" not in metrics
    assert metrics["bad_images"] == [str(photos / "corrupt.jpg")]
    path, reason = (out / "features" / "bad_images.txt").read_text().split("\t")
    assert path == str(photos / "corrupt.jpg") and reason  # the file's path (not an id), the reason
    pixels = np.array([c["pixels"] for c in metrics["clusters"]])
    assert pixels.sum() == 14 * 64 * 64  # every pixel of every readable image at the eval size, in one cluster
    np.testing.assert_allclose([c["pixel_share"] for c in metrics["clusters"]], pixels / pixels.sum())
    sheets = sorted(p.name for p in (out / "evaluate" / "clusters").iterdir())
    assert sheets == sorted(f"cluster-{k}.png" for k in np.flatnonzero(pixels))
    use_store(monkeypatch, out)
    (parent,) = mlflow.search_runs(search_all_experiments=True, filter_string="tags.mlflow.runName = 'run_all'").run_id
    assert mlflow.get_run(parent).info.status == "FINISHED"
    model_uri = line(console, "MLflow model: ").split(": ", 1)[1]
    assert mlflow.get_logged_model(model_uri.removeprefix("models:/")).source_run_id == parent
    assert mlflow.get_run(parent).data.tags["weights"] == "random"


def test_predict_and_export_name_the_clusters(applied):
    out = applied["out"]
    legend = json.loads((out / "predicted" / "names.json").read_text())
    assert legend == {str(k): {0: "sky", 3: "person"}.get(k, f"cluster {k}") for k in range(8)}
    assert "predict: 14 images segmented (14 in the output, 1 unreadable)" in applied["predict"]
    art = torch.load(out / "segmenter.pt", weights_only=True)
    assert art["class_names"][:4] == ["sky", "cluster 1", "cluster 2", "person"] and art["matching"] is None
    assert art["encoder_weights"] is not None  # reloads offline
    assert line(applied["export"], "mlflow_tracking_uri: ") == f"mlflow_tracking_uri: sqlite:///{out / 'mlflow.db'}"


def test_predict_console_is_the_projects(applied):
    text = applied["predict"]
    assert "predict: 15/15 images [" in text and text.strip().splitlines()[-1].startswith("predict: 14 images")
    for ray_line in ("core_worker.cc", "Started a local Ray", "Running Dataset", "(MapWorker", "token"):
        assert ray_line not in text, text


def test_stages_predict_api_pyfunc_and_export_give_identical_labels(applied, photos, monkeypatch):
    import mlflow

    out = applied["out"]
    cfg = prepare(parse_args("", [f"--config={out / 'config.yaml'}"]))
    seg = Segmenter.from_checkpoint(str(out / "bootstrap" / "final.pt"), cfg)
    exported = Segmenter.from_checkpoint(str(out / "segmenter.pt"))
    use_store(monkeypatch, out)
    pyfunc = mlflow.pyfunc.load_model(line(applied["run"], "MLflow model: ").split(": ", 1)[1])
    for name in ("gray16", "alpha", "000000", "000005"):
        path = str(photos / f"{name}.png")
        with Image.open(path) as img:
            img.load()
        h, w = img.size[::-1]
        batch = load_images({"uri": np.array([path])}, tuple(cfg.eval.image_size), seg.resize)  # the stages' input
        stage = predict(seg.encoder, seg.decoder, images_to_device(batch, torch.device("cpu")), (h, w))[0]
        labels = {
            "predict": np.array(Image.open(out / "predicted" / "labels" / f"{name}.png")),
            "api": seg.segment(img)[0],  # the PIL image itself: 16-bit and RGBA as opened
            "pyfunc": pyfunc.predict(np.asarray(img))[0],  # a numpy array: uint16 for the 16-bit PNG
            "export": exported.segment(np.asarray(img))[0],
        }
        for way, got in labels.items():
            np.testing.assert_array_equal(got, stage.astype(np.uint8), err_msg=f"{name}: {way} != stages")
    assert Image.open(io.BytesIO((photos / "gray16.png").read_bytes())).mode == "I;16"
