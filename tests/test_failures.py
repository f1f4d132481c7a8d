"""A failure inside a stage as one line (transfgu_dist.pipeline.failures): Ray's wrappers taken off, data errors
exit 2 with the message, other exceptions exit 1 with the cause and where the traceback is."""

from __future__ import annotations

import pickle

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


def test_storage_error_crosses_a_process_boundary():
    """Ray pickles what a worker raised: the driver gets the same StorageError back (not a TypeError)."""
    error = pickle.loads(pickle.dumps(StorageError("/out/ray_train/state.pt", "not a readable checkpoint")))
    assert type(error) is StorageError and str(error) == "/out/ray_train/state.pt: not a readable checkpoint"
    assert error.uri == "/out/ray_train/state.pt"


def test_what_a_ray_task_or_train_worker_raised_is_the_cause(tmp_path, shared_ray):
    """On a real local Ray: a task's and a Ray Train worker's StorageError come back unwrapped, one line, exit 2."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    def _raises_storage_error(config=None):  # defined here: shipped to the workers by value
        raise StorageError("/out/ray_train/bootstrap/checkpoint_0/state.pt", "not a readable Ray Train checkpoint file")

    with pytest.raises(Exception) as task:  # on the session's Ray (conftest.shared_ray)
        ray.get(ray.remote(_raises_storage_error).remote())
    trainer = TorchTrainer(
        _raises_storage_error,
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(
            storage_path=str(tmp_path), failure_config=ray.train.FailureConfig(max_failures=0)
        ),
    )
    with pytest.raises(Exception) as train:
        trainer.fit()
    for raised in (task.value, train.value):
        root = cause(raised)
        assert type(root) is StorageError and root.uri.endswith("checkpoint_0/state.pt"), repr(raised)[:500]
        assert report(raised, "bootstrap") == 2
