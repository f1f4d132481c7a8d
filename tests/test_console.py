"""The driver's console: progress lines, epoch lines, Ray's C++ lines kept off; the demo's console (shared e2e run)."""

import logging
import os
import re
import time

import pytest

from transfgu_dist.pipeline import console

NATIVE = b"[2026-12-02 01:02:33,867 E 20565 20565] core_worker.cc:2465: Actor with class name: 'MapWorker' ...\n"


def test_pass_through_drops_ray_cpp_lines_and_keeps_the_rest():
    assert console.pass_through(b"one\n" + NATIVE + b"two\n", b"") == (b"one\ntwo\n", b"")
    # a bar's carriage-return update prints at once; a line that may be Ray's waits for its end
    assert console.pass_through(b"extract:  50%\r", b"") == (b"extract:  50%\r", b"")
    assert console.pass_through(NATIVE[:20], b"") == (b"", NATIVE[:20])
    assert console.pass_through(NATIVE[20:], NATIVE[:20]) == (b"", b"")
    fatal = NATIVE.replace(b" E ", b" F ")  # a fatal error stays on the console
    assert console.pass_through(fatal, b"") == (fatal, b"")


def test_native_ray_lines_hidden_filters_fd_2(capfd):
    with console.native_ray_lines_hidden():
        os.write(2, b"kept 1\n" + NATIVE)
        os.write(2, b"kept 2\n")
    os.write(2, NATIVE)  # restored: written as is
    assert capfd.readouterr().err == "kept 1\nkept 2\n" + NATIVE.decode()


def test_progress_off_a_terminal_is_one_line_at_the_end(caplog):
    caplog.set_level(logging.INFO, "transfgu_dist")
    rows = [{"images": 3}] * 4
    assert list(console.track(iter(rows), "extract", 12, lambda r: r["images"])) == rows
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and re.fullmatch(r"extract: 12/12 images \[00:00<00:00, .* images/s\]", lines[0])


def test_progress_off_a_terminal_every_interval(monkeypatch, caplog):
    caplog.set_level(logging.INFO, "transfgu_dist")
    now = [0.0]
    monkeypatch.setattr(console.time, "perf_counter", lambda: now[0])
    progress = console.Progress("pseudo_label", 8, tty=False)
    for now[0] in (10, 35, 50, 70):  # a line 30 s or more after the last one, and one at the end
        progress.update(2)
    progress.close()
    assert [r.getMessage() for r in caplog.records] == [
        "pseudo_label: 4/8 images [00:35<00:35,  0.11 images/s]",
        "pseudo_label: 8/8 images [01:10<00:00,  0.11 images/s]",
    ]


def test_epoch_line():
    m = {
        "loss/total": 3.5787,
        "loss/peer": 2.1498,
        "loss/diversity": 0.1,
        "loss/uncertainty": 0.31,
        "round": 1,
        "epoch": 0,
        "global_epoch": 2,
        "val/miou": 0.40741,
        "epoch_seconds": 12.34,
        "alpha": 0.5,
    }
    assert console.epoch_line(m, 4) == (
        "bootstrap: epoch 3/4 (round 1, epoch 0): loss 3.579 (peer 2.150, "
        "diversity 0.100, uncertainty 0.310), val mIoU 40.74, 12.3 s/epoch"
    )
    assert (
        console.epoch_line({"loss/total": 1.0, "round": 0, "epoch": 0, "global_epoch": 0}, 1)
        == "bootstrap: epoch 1/1 (round 0, epoch 0): loss 1.000 ()"
    )


@pytest.mark.slow
def test_demo_console_is_short_shows_progress_and_epochs_and_ends_in_the_summary(e2e_run):
    text = (e2e_run / "console.log").read_text()
    lines = text.strip().splitlines()
    assert len(lines) <= 40, text
    assert lines[-1].startswith("MLflow: mlflow ui") and any(line.startswith("mIoU ") for line in lines[-5:])
    assert sum(line.startswith("| ") and line.endswith(" |") for line in lines) == 7  # header + the table's 6 rows
    for stage, n in (("extract", 12), ("pseudo_label", 12), ("evaluate", 6)):  # one progress line each (no TTY)
        assert sum(f" {stage}: {n}/{n} images [" in line for line in lines) == 1, text
    epochs = [line for line in lines if "bootstrap: epoch " in line]
    assert len(epochs) == 2 and "epoch 1/2 (round 0, epoch 0): loss " in epochs[0], text
    assert "epoch 2/2 (round 1, epoch 0)" in epochs[1] and "val mIoU" in epochs[1] and "s/epoch" in epochs[1]
    for ray_line in (
        "core_worker.cc",
        "authentication_token_setup",
        "Progress bars disabled",
        "(MapWorker",
        "Running Dataset",
        "(RayTrainWorker",
        "(TrainController",
    ):
        assert ray_line not in text, text


@pytest.mark.slow
def test_demo_logs_the_model_to_mlflow(e2e_run):
    """The parent run's pyfunc model (export.log_mlflow_model) loads and segments an image."""
    import mlflow
    import numpy as np

    uri = next(
        line.split(": ", 1)[1]
        for line in (e2e_run / "console.log").read_text().splitlines()
        if line.startswith("MLflow model: ")
    )
    mlflow.set_tracking_uri(f"sqlite:///{e2e_run / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(uri)
    labels = model.predict(np.zeros((64, 64, 3), np.uint8))
    assert len(labels) == 1 and labels[0].shape == (64, 64)


def test_progress_off_a_terminal_shows_a_line_when_nothing_moved(monkeypatch, caplog):
    caplog.set_level(logging.INFO, "transfgu_dist")
    monkeypatch.setattr(console.Progress, "every", 0.2)
    progress = console.Progress("extract", 5, tty=False)
    time.sleep(0.5)  # no image done yet: a line is due anyway
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("extract: 0/5 images [") and lines[-1].startswith("extract: 0/5 images [")
    assert len(lines) >= 2


def test_images_done_reports_each_image_once_per_call():
    import queue as stdlib_queue  # the put_nowait of ray.util.queue.Queue, in-process

    from transfgu_dist.pipeline.image_stage import ImagesDone

    queue = stdlib_queue.Queue()
    done = ImagesDone(queue)
    done.upto(2)
    done.upto(2)  # no new image
    done.upto(5)
    done.finish(6)  # an unreadable sixth image counted at the end
    done.upto(1)  # the next call starts from 0
    assert [queue.get_nowait() for _ in range(queue.qsize())] == [2, 3, 1, 1]
    ImagesDone(None).finish(4)  # no queue: nothing to report
