"""jobs/predict.py and jobs/export.py: a trained Segmenter applied or exported, through the same command line as
run_all (--help, every mistake one `error:` line with exit status 2 before Ray starts, the project's console,
Ctrl-C one line and exit 130)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from transfgu_dist.config import Config, ConfigError
from transfgu_dist.io import storage
from transfgu_dist.io.storage_errors import StorageError
from transfgu_dist.pipeline.cli import ask_for_token_auth, parse_args, prepare, ray_console, user_error
from transfgu_dist.pipeline.failures import Reported
from transfgu_dist.pipeline.interrupt import ctrl_c

log = logging.getLogger("transfgu_dist")

COMMON_KEYS = ("run", "checkpoint", "metrics", "names", "output")
KEYS = {
    "predict": (*COMMON_KEYS, "input", "crf", "stride", "probs"),
    "export": (*COMMON_KEYS, "torchscript", "embed_encoder"),
}
REQUIRED = {"predict": ("input", "output"), "export": ()}


def flag(keys: dict[str, str], name: str, default: str = "false") -> bool:
    return keys.get(name, default).lower() in ("1", "true", "yes")


def job_keys(job: str, args: argparse.Namespace) -> dict[str, str]:
    """The job's own `key=value` arguments (removed from args.overrides, which keep `section.key=value`); an
    unknown key or a missing required one is a ConfigError listing the job's keys."""
    keys, overrides = {}, []
    for arg in args.overrides:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"argument {arg!r}: expected key=value ({', '.join(KEYS[job])}) or section.key=value")
        if "." in key:
            overrides.append(arg)
        elif key in KEYS[job]:
            keys[key] = value
        else:
            raise ConfigError(
                f"unknown key '{key}': {job} takes {', '.join(f'{k}=' for k in KEYS[job])} "
                f"and section.key=value config overrides (see --help)"
            )
    args.overrides = overrides
    missing = [k for k in REQUIRED[job] if k not in keys]
    if missing:
        raise ConfigError(f"give {' and '.join(f'{k}=' for k in missing)} (see --help)")
    return keys


def load_segmenter(keys: dict[str, str], args: argparse.Namespace) -> tuple[Any, Config]:
    """The Segmenter of `run=` (its config.yaml unless --config), `checkpoint=` (default <run>/bootstrap/final.pt),
    `metrics=` (default <run>/evaluate/metrics.json when it scored), `names=`, `crf=` and `stride=`."""
    from transfgu_dist.inference.segmenter import Segmenter, SlidingWindow

    with (
        storage.local_copy(storage.join(keys["run"], "config.yaml"))
        if "run" in keys and not args.config
        else contextlib.nullcontext(args.config) as config_path
    ):
        args.config = config_path
        cfg = prepare(args)
    if "run" in keys:  # a moved or copied run: its own folder, not the output its config.yaml recorded
        cfg.output = keys["run"] if "://" in keys["run"] else os.path.abspath(keys["run"])
    checkpoint = keys.get("checkpoint", storage.join(cfg.output, "bootstrap", "final.pt"))
    metrics = keys.get("metrics", storage.join(cfg.output, "evaluate", "metrics.json"))
    if "metrics" not in keys and not (storage.exists(metrics) and storage.read_json(metrics).get("scored", True)):
        metrics = None
    seg = Segmenter.from_checkpoint(checkpoint, cfg, metrics=metrics)
    if "names" in keys:
        from transfgu_dist.inference.names import read_names

        seg.name_clusters(read_names(keys["names"], seg.decoder.n_outputs))
    if flag(keys, "crf"):
        from transfgu_dist.method.crf import CRFConfig

        seg.crf = CRFConfig()
    if "stride" in keys:  # sliding-window inference with windows of the training input size
        if not keys["stride"].isdigit() or int(keys["stride"]) < 1:
            raise ValueError(f"stride={keys['stride']}: expected the sliding-window step in pixels, an integer >= 1")
        seg.sliding = SlidingWindow(tuple(cfg.train.image_size), int(keys["stride"]))
    return seg, cfg


def segmenter_job(job: str, description: str, apply: Callable[..., Any], argv: Sequence[str] | None = None) -> Any:
    """Parse, check everything (`check(seg, cfg, keys)` too) before Ray, then `apply(seg, cfg, keys, args)`."""
    from transfgu_dist.inference.segmenter import CheckpointError
    from transfgu_dist.io.images import BadImageError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(description, argv)
    args.argv = argv
    if not args.verbose:
        logging.getLogger("timm").setLevel(logging.WARNING)
        ask_for_token_auth(args.address)
    try:
        keys = job_keys(job, args)
        for key in ("output", "input"):
            if key in keys and "://" not in keys[key]:
                keys[key] = os.path.abspath(keys[key])
        seg, cfg = load_segmenter(keys, args)
        if job == "predict":
            from transfgu_dist.inference.predict import list_inputs
            from transfgu_dist.pipeline.preflight import check_writable

            list_inputs(keys["input"])
            check_writable("output", keys["output"])
    except (CheckpointError, ConfigError, BadImageError, StorageError, ValueError) as e:
        user_error(args, e)
    with Reported(args.debug, job):  # a failure while it runs: one line (pipeline.failures)
        return apply(seg, cfg, keys, args)


def _predict(seg: Any, cfg: Config, keys: dict[str, str], args: argparse.Namespace) -> Any:
    from transfgu_dist.inference.predict import run_predict
    from transfgu_dist.pipeline.console import track

    kept = f"the label maps written so far under {keys['output']} (a rerun skips them)"
    with ctrl_c(lambda: kept, args.argv), ray_console(args):
        report = run_predict(
            seg,
            keys["input"],
            keys["output"],
            batch_size=cfg.eval.batch_size,
            probs=flag(keys, "probs"),
            resources=cfg.resources,
            progress=lambda rows, n: track(rows, "predict", n, lambda row: 1),
        )
    print(report.summary())
    return report


def run_predict_job(description: str, argv: Sequence[str] | None = None) -> Any:
    return segmenter_job("predict", description, _predict, argv)


def _export(seg: Any, cfg: Config, keys: dict[str, str], args: argparse.Namespace) -> dict[str, str]:
    from transfgu_dist.inference.export import export, export_torchscript, log_mlflow_model
    from transfgu_dist.pipeline import tracking

    embed = flag(keys, "embed_encoder", "true")
    target = keys.get("output", storage.join(cfg.output, "export", "segmenter.pt"))
    out = {"artifact": export(seg, target, embed_encoder=embed)}
    if flag(keys, "torchscript"):
        out["torchscript"] = export_torchscript(seg, out["artifact"].removesuffix(".pt") + ".torchscript.pt")
    with tracking.run(cfg, "export"):
        out["mlflow_model"] = log_mlflow_model(seg, embed_encoder=embed)
    out["mlflow_tracking_uri"] = tracking.tracking_uri(cfg)  # where the models:/ URI resolves
    print("\n".join(f"{k}: {v}" for k, v in out.items()))
    return out


def run_export_job(description: str, argv: Sequence[str] | None = None) -> dict[str, str]:
    return segmenter_job("export", description, _export, argv)
