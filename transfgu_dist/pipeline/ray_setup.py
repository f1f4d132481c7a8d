"""Starting or joining Ray for a job, with the console kept to the project's own lines."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Any

import ray


def init_ray(address: str | None = None, verbose: bool = True) -> None:
    """Connect to the cluster (`address`, RAY_ADDRESS, or `ray job submit`'s) or start a local Ray in-process.
    verbose=False: workers' logs stay in Ray's log files (/tmp/ray/session_latest/logs), no Ray Data progress bars."""
    if not ray.is_initialized():
        keep_idle_workers()
        if not verbose:
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
            logging.getLogger("ray").setLevel(logging.WARNING)
        ray.init(address=address, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = verbose
        ctx.print_on_execution_start = verbose
    if not verbose:
        quiet_libraries()


def quiet_libraries() -> None:
    """Only warnings from Ray, Ray Data, MLflow and FAISS on the driver's console (their INFO lines stay in Ray's
    log files), no deprecation warnings from inside Ray, and no MLflow artifact progress bars."""
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "faiss"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled": ours show
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # logging the model: no download bar
    warnings.filterwarnings("ignore", module=r"ray\.")


def keep_idle_workers(seconds: int = 60) -> None:
    """For a Ray started by this process (ignored when joining a cluster): idle task workers live `seconds`, not
    Ray's 1 s, so each epoch's and stage's Ray Data tasks reuse warm processes instead of spawning and importing
    torch again (a fresh worker spends seconds importing torch; a warm one starts its task at once)."""
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", str(seconds * 1000))


def fit(trainer: Any) -> Any:
    """`trainer.fit()` (a Ray Train trainer or a Ray Tune Tuner) on a helper thread while the main thread waits.
    Called on the main thread, both install their own SIGINT handler (Ray Train never restores the previous one), so
    Ctrl-C would abort through Ray instead of reaching interrupt.ctrl_c (one line, exit 130)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 (re-raised on the main thread)
            box["error"] = e

    thread = threading.Thread(target=run, name="fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]
