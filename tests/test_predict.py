"""Applying a trained segmenter: the predict stage on odd images (local and S3), the Python API, the export."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, boto3_s3
from figures import check
from PIL import Image

from transfgu_dist.inference.export import SegmenterNet, export
from transfgu_dist.inference.predict import read_probs, run_predict
from transfgu_dist.inference.segmenter import CheckpointError, Segmenter, SlidingWindow, predict
from transfgu_dist.io import storage
from transfgu_dist.io.datasets import list_samples
from transfgu_dist.io.image_pool import images_to_device, load_images
from transfgu_dist.io.images import decode_image
from transfgu_dist.pipeline import tracking
from transfgu_dist.pipeline.cli import parse_args, prepare
from transfgu_dist.pipeline.segmenter_jobs import run_export_job
from transfgu_dist.pipeline.stages.evaluate import run_evaluate

pytestmark = pytest.mark.slow

SIZES = {"portrait": (40, 24), "tiny": (5, 7), "gray": (30, 30), "sub/wide": (20, 90)}  # id -> (H, W)


def odd_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {}
    for name, (h, w) in SIZES.items():
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8))
        buf = io.BytesIO()
        (img.convert("L") if name == "gray" else img).save(buf, format="JPEG" if name == "tiny" else "PNG")
        files[name + (".jpg" if name == "tiny" else ".png")] = buf.getvalue()
    files["broken.png"] = b"not an image"
    return files


@pytest.fixture(scope="module")
def trained(e2e_run):
    cfg = prepare(parse_args("", [f"--config={e2e_run / 'config.yaml'}"]))
    metrics = str(e2e_run / "evaluate" / "metrics.json")
    return cfg, Segmenter.from_checkpoint(str(e2e_run / "bootstrap" / "final.pt"), cfg, metrics=metrics)


def check_outputs(src: str, out: str, report) -> None:
    assert report.bad == ["broken"] and report.images == len(SIZES)
    for name, (h, w) in SIZES.items():
        labels = decode_image(storage.read_bytes(storage.join(out, "labels", f"{name}.png")), name)
        assert labels.shape[:2] == (h, w)  # at the original resolution
        overlay = Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "overlays", f"{name}.png"))))
        assert overlay.height >= 320
    assert storage.read_bytes(storage.join(out, "bad_images.txt")).decode().split() == [storage.join(src, "broken.png")]


def test_predict_odd_images_local_and_s3_resumes(trained, shared_ray, tmp_path, s3_bucket, s3_server):
    _, seg = trained
    src = tmp_path / "in"
    for name, data in odd_images().items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
        boto3_s3(s3_server).put_object(Bucket=s3_bucket[5:], Key=f"in/{name}", Body=data)
    for inputs, out in [(str(src), str(tmp_path / "out")), (f"{s3_bucket}/in", f"{s3_bucket}/out")]:
        report = run_predict(seg, inputs, out, batch_size=2)
        assert report.processed == len(SIZES)
        check_outputs(inputs, out, report)
    again = run_predict(seg, str(src), str(tmp_path / "out"))
    assert again.processed == 0 and "0 images segmented" in again.summary()
    check_outputs(str(src), str(tmp_path / "out"), again)
    labels = np.array(Image.open(tmp_path / "out" / "labels" / "portrait.png"))
    assert set(np.unique(labels)) <= set(range(len(seg.class_names))) | {254}  # matched class ids


def test_segment_equals_evaluate_predict(trained, e2e_run):
    cfg, seg = trained
    uris = [s.image for s in list_samples(cfg, cfg.data.val_split)[:3]]
    batch = load_images({"uri": np.array(uris)}, tuple(cfg.eval.image_size))
    evaluated = predict(seg.encoder, seg.decoder, images_to_device(batch, torch.device("cpu")), cfg.eval.image_size)
    segmented = seg.segment(list(batch["image"]))
    np.testing.assert_array_equal(np.stack(segmented), seg.to_classes(evaluated))


def test_export_reloads_with_identical_labels(trained, e2e_run, tmp_path):
    _, seg = trained
    image = np.random.default_rng(1).integers(0, 255, (37, 53, 3), np.uint8)
    path = export(seg, str(tmp_path / "segmenter.pt"))
    again = Segmenter.from_checkpoint(path)  # no config
    assert again.class_names == seg.class_names and (again.matching == seg.matching).all()
    np.testing.assert_array_equal(again.segment(image)[0], seg.segment(Image.fromarray(image))[0])
    with pytest.raises(CheckpointError, match="needs the training config"):
        Segmenter.from_checkpoint(str(e2e_run / "bootstrap" / "final.pt"))


def test_predict_job_wrong_checkpoint_fails_in_one_line(e2e_run, tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save({"decoder": {}}, wrong)
    proc = subprocess.run(
        [
            sys.executable,
            f"{ROOT}/jobs/predict.py",
            f"run={e2e_run}",
            f"checkpoint={wrong}",
            f"input={tmp_path}",
            f"output={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith(f"error: {wrong}: expected a bootstrap"), proc.stderr


def test_export_job_mlflow_pyfunc_and_torchscript_equal_eager(trained, e2e_run, tmp_path):
    import mlflow

    cfg, seg = trained
    out = run_export_job("", [f"run={e2e_run}", f"output={tmp_path / 'segmenter.pt'}", "torchscript=true"])
    image = np.random.default_rng(2).integers(0, 255, (50, 70, 3), np.uint8)
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))  # the run's own local store, where the job logged it
    model = mlflow.pyfunc.load_model(out["mlflow_model"])
    np.testing.assert_array_equal(model.predict(image)[0], seg.segment(image)[0])
    traced = torch.jit.load(out["torchscript"])
    x = torch.rand(3, 3, *seg.image_size)  # traced at batch 2: the batch size is free, the input size fixed
    with torch.no_grad():
        torch.testing.assert_close(traced(x), SegmenterNet(seg)(x), rtol=0, atol=1e-5)


def test_predict_probs_parquet_with_sliding_windows(trained, shared_ray, tmp_path):
    cfg, seg = trained
    seg = dataclasses.replace(seg, sliding=SlidingWindow(tuple(cfg.train.image_size), stride=16))
    src, out = tmp_path / "in", str(tmp_path / "out")
    src.mkdir()
    shapes = {"big": (100, 150), "portrait": (40, 24)}
    for name, (h, w) in shapes.items():
        Image.fromarray(np.random.default_rng(h).integers(0, 255, (h, w, 3), np.uint8)).save(src / f"{name}.png")
    assert run_predict(seg, str(src), out, batch_size=2, probs=True).processed == 2
    probs, n = read_probs(out), seg.decoder.n_outputs
    parts = sorted((tmp_path / "out" / "probs").iterdir())
    classes = seg.to_classes(np.arange(n))  # cluster -> class id of the label PNG
    for name, (h, w) in shapes.items():
        p, labels = probs[name], np.array(Image.open(tmp_path / "out" / "labels" / f"{name}.png"))
        assert p.dtype == np.float16 and p.shape == (n, h, w) and labels.shape == (h, w)
        np.testing.assert_allclose(p.astype(np.float32).sum(0), 1, atol=1e-2)
        top = p == p.max(0)  # the argmax; fp16 may tie the top two, the label's cluster is then one of them
        assert (top & (classes[:, None, None] == labels)).any(0).all()
        assert (classes[p.argmax(0)] == labels)[top.sum(0) == 1].all()
    assert run_predict(seg, str(src), out, probs=True).processed == 0
    assert sorted((tmp_path / "out" / "probs").iterdir()) == parts  # a rerun writes nothing


def test_evaluate_with_crf_kept_apart(e2e_run, shared_ray):
    cfg = prepare(parse_args("", [f"--config={e2e_run / 'config.yaml'}", "eval.crf=true"]))
    refined = run_evaluate(cfg).manifest["metrics"]
    plain = storage.read_json(str(e2e_run / "evaluate" / "metrics.json"))
    assert (e2e_run / "evaluate-crf" / "_SUCCESS.json").exists()
    check("evaluate_crf", {k: refined[k] for k in ("miou", "pixel_accuracy")})
    assert refined["n_images"] == plain["n_images"] and refined["checkpoint"] == plain["checkpoint"]
