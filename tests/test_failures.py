"""A failure inside a stage as one line (transfgu_dist.pipeline.failures): Ray's wrappers taken off, data errors
exit 2 with the message, other exceptions exit 1 with the cause and where the traceback is."""

from __future__ import annotations

import pytest
from ray.exceptions import RayTaskError
from ray.train import ControllerError, WorkerGroupError

from transfgu_dist.io.storage_errors import StorageError
from transfgu_dist.pipeline.failures import Reported, cause, one_line, report


def test_cause_unwraps_ray_task_and_train_errors():
    damaged = StorageError("/out/bank/part-1.parquet", "part is 10 bytes, the manifest records 20")
    task = RayTaskError("ConceptMapper.__init__", "Traceback (most recent call last):\n  ...", damaged)
    assert cause(task) is damaged
    assert cause(WorkerGroupError("rank 1 failed", {1: task, 0: KeyError("x")})).args == ("x",)  # lowest rank
    assert cause(WorkerGroupError("rank 1 failed", {1: task})) is damaged
    assert cause(ControllerError(task)) is damaged
    assert cause(damaged) is damaged


def test_one_line_takes_the_last_quoted_exception_of_a_ray_text():
    text = "The actor died because of an error raised in its creation task, \x1b[36mray::A\x1b[39m\nTraceback:\n"
    text += '  File "x.py", line 3\nValueError: inner\n\nThe above exception ...\nStorageError: /c.npz: not an .npz'
    assert one_line(RuntimeError(text)) == "StorageError: /c.npz: not an .npz"
    assert one_line(StorageError("/a b", "two\n  lines")) == "/a b: two lines"


def test_report_exit_status_and_line(capsys):
    damaged = StorageError("/out/concepts/concepts.npz", "expected the cluster stage's .npz")
    assert report(RayTaskError("f", "tb", damaged), "pseudo_label") == 2
    assert capsys.readouterr().err == "error: /out/concepts/concepts.npz: expected the cluster stage's .npz\n"
    assert report(WorkerGroupError("w", {0: ZeroDivisionError("division by zero")}), "bootstrap") == 1
    line = capsys.readouterr().err
    assert line.startswith("error: bootstrap failed: ZeroDivisionError: division by zero (a bug; the traceback")
    log = line.split(" is in ")[1].split(";")[0]
    assert "WorkerGroupError" in open(log).read() and line.count("\n") == 1


def test_reported_exits_unless_debug(capsys):
    with pytest.raises(SystemExit) as e, Reported(debug=False) as failure:
        failure.stage = "evaluate"
        raise StorageError("/out/bootstrap/final.pt", "not a readable PyTorch checkpoint")
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: /out/bootstrap/final.pt: not a")
    with pytest.raises(StorageError), Reported(debug=True):
        raise StorageError("/x", "y")
