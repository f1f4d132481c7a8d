"""A failure inside a stage as one line on the console, raised in the driver or in a Ray worker alike.

Ray wraps what a worker raised (RayTaskError, Ray Data's UserCodeException, Ray Train's WorkerGroupError and
ControllerError); `cause` unwraps it. Damaged or wrong data (a file named in the message: StorageError,
CheckpointError, ConfigError, a bad image, label or dataset layout) is `error: <message>` with exit status 2; any
other exception is a bug: `error: <stage> failed: <type>: <first line>` and where the full traceback was written,
exit status 1. With --debug the exception propagates with its traceback. Imports neither Ray nor torch.
"""

from __future__ import annotations

import re
import sys
import tempfile
import traceback
from types import TracebackType

from transfgu_dist.config import ConfigError
from transfgu_dist.io.storage_errors import StorageError

# the last `SomeError: message` line of a Ray error's text (an actor's creation task error carries no cause object)
_RAISED = re.compile(r"^(\w+(?:Error|Exception)): (.*)$", re.MULTILINE)


def data_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean damaged or wrong data, each naming its file or key (imported lazily)."""
    from transfgu_dist.inference.segmenter import CheckpointError
    from transfgu_dist.io.datasets import DatasetLayoutError
    from transfgu_dist.io.images import BadImageError
    from transfgu_dist.io.label_maps import LabelMapError

    return ConfigError, StorageError, CheckpointError, BadImageError, DatasetLayoutError, LabelMapError


def cause(error: BaseException) -> BaseException:
    """The exception a worker (or the driver) raised, with Ray's wrappers taken off."""
    from ray.exceptions import RayTaskError, UserCodeException
    from ray.train import ControllerError, WorkerGroupError

    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, WorkerGroupError) and error.worker_failures:
            error = error.worker_failures[min(error.worker_failures)]
        elif isinstance(error, ControllerError):
            error = error.controller_failure
        elif isinstance(error, RayTaskError) and error.cause is not None:
            error = error.cause
        elif isinstance(error, UserCodeException) and error.__cause__ is not None:
            error = error.__cause__
    return error


def one_line(error: BaseException) -> str:
    """The error's message on one line (a Ray error's text: the last exception line it quotes)."""
    text = str(error)
    quoted = _RAISED.findall(text) if "\n" in text else []
    if quoted:
        name, text = quoted[-1]
        text = f"{name}: {text}"
    return " ".join(text.split())


def report(error: BaseException, stage: str) -> int:
    """Print `error` (raised while running `stage`) as one `error:` line on stderr; returns the exit status."""
    root = cause(error)
    if isinstance(root, data_errors()):
        print(f"error: {one_line(root)}", file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile("w", prefix=f"transfgu-{stage}-", suffix=".txt", delete=False) as f:
        traceback.print_exception(error, file=f)
    print(
        f"error: {stage} failed: {type(root).__name__}: {one_line(root)[:300]} (a bug; the traceback, a worker's "
        f"included, is in {f.name}; --debug shows it here)",
        file=sys.stderr,
    )
    return 1


class Reported:
    """Context manager around a job's stages: an exception leaving it is reported (`report`) and the job exits with
    its status, unless `debug`. `stage`: what runs in it (a job with stages sets it to the stage running)."""

    def __init__(self, debug: bool, stage: str = "driver"):
        self.debug, self.stage = debug, stage

    def __enter__(self) -> Reported:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if error is not None and isinstance(error, Exception) and not self.debug:
            raise SystemExit(report(error, self.stage))
