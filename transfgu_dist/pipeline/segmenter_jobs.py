"""The jobs that apply a trained model (jobs/predict.py, jobs/export.py): a Segmenter loaded from a training run
or a checkpoint, then predict on any images or export one self-contained file plus an MLflow model."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from transfgu_dist.config import Config, ConfigError
from transfgu_dist.io import storage
from transfgu_dist.io.storage_errors import StorageError
from transfgu_dist.pipeline.cli import parse_args, prepare

SEGMENTER_KEYS = ("run", "input", "output", "checkpoint", "metrics", "crf", "stride", "probs", "torchscript")


def _flag(keys: dict[str, str], name: str) -> bool:
    return keys.get(name, "false").lower() in ("1", "true", "yes")


def segmenter_job(
    description: str,
    job: Callable[[Any, Config, dict[str, str], argparse.Namespace], Any],
    required: Sequence[str],
    argv: Sequence[str] | None = None,
) -> Any:
    """jobs/predict.py and jobs/export.py: load a Segmenter from `run=` (a training output; its config.yaml is the
    config unless --config is given), `checkpoint=` (default <run>/bootstrap/final.pt) and `metrics=` (default
    <run>/evaluate/metrics.json when it exists), then `job(seg, cfg, keys, args)`. Other section.key=value
    arguments override the config; a wrong checkpoint, config or path fails in one line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(description, argv)
    keys = dict(o.split("=", 1) for o in args.overrides if o.split("=", 1)[0] in SEGMENTER_KEYS)
    args.overrides = [o for o in args.overrides if o.split("=", 1)[0] not in SEGMENTER_KEYS]
    missing = [k for k in required if k not in keys]
    if missing:
        sys.exit(f"give {' and '.join(f'{k}=' for k in missing)} (see --help)")
    from transfgu_dist.inference.segmenter import CheckpointError, Segmenter

    try:
        with (
            storage.local_copy(storage.join(keys["run"], "config.yaml"))
            if "run" in keys and not args.config
            else contextlib.nullcontext(args.config) as config_path
        ):
            args.config = config_path
            cfg = prepare(args)
        if "run" in keys:  # a moved or copied run: its own folder, not the output its config.yaml recorded
            cfg.output = keys["run"] if "://" in keys["run"] else os.path.abspath(keys["run"])
        run = cfg.output
        checkpoint = keys.get("checkpoint", storage.join(run, "bootstrap", "final.pt"))
        metrics = keys.get("metrics", storage.join(run, "evaluate", "metrics.json"))
        if "metrics" not in keys and not storage.exists(metrics):
            metrics = None
        seg = Segmenter.from_checkpoint(checkpoint, cfg, metrics=metrics)
        if _flag(keys, "crf"):
            from transfgu_dist.method.crf import CRFConfig

            seg.crf = CRFConfig()
        if "stride" in keys:  # sliding-window inference with windows of the training input size
            from transfgu_dist.inference.segmenter import SlidingWindow

            if not keys["stride"].isdigit() or int(keys["stride"]) < 1:
                raise ValueError(
                    f"stride={keys['stride']}: expected the sliding-window step in pixels, an integer >= 1"
                )
            seg.sliding = SlidingWindow(tuple(cfg.train.image_size), int(keys["stride"]))
        if "output" in keys and "://" not in keys["output"]:
            keys["output"] = os.path.abspath(keys["output"])
        return job(seg, cfg, keys, args)
    except (CheckpointError, ConfigError, StorageError, ValueError) as e:
        sys.exit(str(e).splitlines()[0])


def _predict(seg: Any, cfg: Config, keys: dict[str, str], args: argparse.Namespace) -> Any:
    from transfgu_dist.inference.predict import run_predict
    from transfgu_dist.pipeline.ray_setup import init_ray

    init_ray(args.address)
    report = run_predict(
        seg,
        keys["input"],
        keys["output"],
        batch_size=cfg.eval.batch_size,
        probs=_flag(keys, "probs"),
        resources=cfg.resources,
    )
    print(report.summary())
    return report


def run_predict_job(description: str, argv: Sequence[str] | None = None) -> Any:
    return segmenter_job(description, _predict, ("input", "output"), argv)


def _export(seg: Any, cfg: Config, keys: dict[str, str], args: argparse.Namespace) -> dict[str, str]:
    from transfgu_dist.inference.export import export, export_torchscript, log_mlflow_model
    from transfgu_dist.pipeline import tracking

    out = {
        "artifact": export(seg, keys.get("output", storage.join(keys.get("run", cfg.output), "export", "segmenter.pt")))
    }
    if _flag(keys, "torchscript"):
        out["torchscript"] = export_torchscript(seg, out["artifact"].removesuffix(".pt") + ".torchscript.pt")
    with tracking.run(cfg, "export"):
        out["mlflow_model"] = log_mlflow_model(seg)
    print("\n".join(f"{k}: {v}" for k, v in out.items()))
    return out


def run_export_job(description: str, argv: Sequence[str] | None = None) -> dict[str, str]:
    return segmenter_job(description, _export, (), argv)
