"""Command line shared by the jobs: config loading, Ray start-up, and running stages in order with resume."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from transfgu_dist.config import DERIVED_SIZES, PRESETS, PROFILES, Config, ConfigError, load_config, to_dict
from transfgu_dist.io import storage
from transfgu_dist.io.storage_errors import StorageError
from transfgu_dist.pipeline import contract, lease
from transfgu_dist.pipeline.contract import STAGES, StageResult
from transfgu_dist.pipeline.failures import Reported
from transfgu_dist.pipeline.interrupt import ctrl_c

log = logging.getLogger("transfgu_dist")


def _stage(name: str) -> Callable[..., StageResult]:
    """The stage's run function (imported lazily: `--help` stays fast)."""
    from transfgu_dist.pipeline.stages import bootstrap, cluster, evaluate, extract, pseudo_label

    return {
        "extract": extract.run_extract,
        "cluster": cluster.run_cluster,
        "pseudo_label": pseudo_label.run_pseudo_label,
        "bootstrap": bootstrap.run_bootstrap,
        "evaluate": evaluate.run_evaluate,
    }[name]


def help_epilog() -> str:
    """Presets, every config section with its keys and defaults (from the dataclasses), and working examples."""
    lines = [
        f"presets: {', '.join(PRESETS)} (default synthetic)",
        "",
        "config keys (section.key=value on the command line, or sections in a --config YAML file; "
        "defaults before the preset; <rule>: derived when unset):",
    ]
    top = Config()
    lines.append(
        "  "
        + " ".join(
            f"{f.name}={getattr(top, f.name)!r}"
            for f in dataclasses.fields(top)
            if not dataclasses.is_dataclass(getattr(top, f.name))
        )
    )
    for f in dataclasses.fields(top):
        section = getattr(top, f.name)
        if dataclasses.is_dataclass(section):
            keys = " ".join(
                f"{k.name}=<{DERIVED_SIZES[f'{f.name}.{k.name}']}>"
                if f"{f.name}.{k.name}" in DERIVED_SIZES
                else f"{k.name}={getattr(section, k.name)!r}".replace("'", "").replace("(", "[").replace(")", "]")
                for k in dataclasses.fields(section)
            )
            lines.append(f"  {f.name}: {keys}")
    lines += [
        "",
        "examples:",
        "  python jobs/run_all.py                                  # the synthetic demo",
        '  python jobs/run_all.py train.lr=2e-4 train.round_epochs="[1, 1]" output=outputs/try',
        "  python jobs/run_all.py --preset cocostuff27 data.root=/data/coco output=/runs/coco27",
        "  python jobs/run_all.py --preset voc encoder.weights=/w/dino_deitsmall8_pretrain.pth "
        "data.root=s3://bucket/voc output=s3://bucket/runs/voc",
        "",
        "cluster sizing (cluster/aws-gpu.yaml: up to 4 one-GPU g5.xlarge workers, none at the start): "
        "resources.actor_gpus=1 resources.pool_min=1 resources.pool_max=4 train.num_workers=[1,4] (each "
        "pool_max x actor_gpus and train max <= the GPU workers' max_workers x GPUs per node; the autoscaler adds "
        "GPU nodes as the stages ask for them); resources.actor_gpus=null and train.use_gpu=null: use the GPUs "
        "present at the start, else the CPU (the synthetic preset's defaults, for a laptop).",
        "",
        "A mistake (key, value, path, label file) is one line on stderr and exit status 2 "
        "before Ray or MLflow start; --debug shows the traceback.",
    ]
    return "\n".join(lines)


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_epilog()
    )
    parser.add_argument("--config", help="YAML config (sections as in transfgu_dist/config/schema.py)")
    parser.add_argument("--preset", help="dataset preset (default: synthetic, or the file's `preset`)")
    parser.add_argument("--profile", choices=tuple(PROFILES), help="reference (default) or paper")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, or a local Ray started here)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a configuration error or a failure")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress bars on the console")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_intermixed_args(argv)


def prepare(args: argparse.Namespace) -> Config:
    """Load the config and make local paths absolute (Ray workers run elsewhere)."""
    cfg = load_config(args.config, args.overrides, preset=args.preset, profile=args.profile)
    if "://" not in cfg.output:
        cfg.output = os.path.abspath(cfg.output)
    if cfg.data.root and "://" not in cfg.data.root:
        cfg.data.root = os.path.abspath(cfg.data.root)
    return cfg


def preflight(args: argparse.Namespace, stages: Sequence[str]) -> tuple[Config, str]:
    """Config, paths, data, labels and weights checked before Ray or MLflow start; a mistake exits 2 with one line
    on stderr. Returns the config and what the weights are: `dino`, `random` or `random-fallback`."""
    try:
        cfg = prepare(args)
        from transfgu_dist.io.datasets import DatasetLayoutError
        from transfgu_dist.io.images import BadImageError
        from transfgu_dist.io.label_maps import LabelMapError
        from transfgu_dist.io.weights import EncoderLoadError, resolve_encoder
        from transfgu_dist.pipeline import preflight as checks

        try:
            checks.check(cfg, list(stages))
            wanted = cfg.encoder.weights
            cfg.encoder = resolve_encoder(cfg.encoder)
            lease.hold(cfg.output)  # one driver per output; the second is refused in one line
            check_output(cfg, stages)
        except (DatasetLayoutError, EncoderLoadError, BadImageError, LabelMapError, StorageError) as e:
            raise ConfigError(str(e)) from e
    except ConfigError as e:
        user_error(args, e)
    weights = "dino" if cfg.encoder.weights != "random" else "random" if wanted == "random" else "random-fallback"
    return cfg, weights


def user_error(args: argparse.Namespace, e: Exception) -> NoReturn:
    """A mistake found before compute: one line on stderr, exit status 2 (--debug: the traceback)."""
    if args.debug:
        raise e
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    raise SystemExit(2) from None


@contextlib.contextmanager
def ray_console(args: argparse.Namespace) -> Iterator[None]:
    """Start or join Ray with the project's console (Ray's own lines off unless --verbose) for the block."""
    from transfgu_dist.pipeline.console import native_ray_lines_hidden
    from transfgu_dist.pipeline.ray_setup import init_ray

    init_ray(args.address, verbose=args.verbose)
    with native_ray_lines_hidden(not args.verbose):
        yield


def check_output(cfg: Config, stages: Sequence[str]) -> None:
    """Refuse to resume into outputs made with other settings (settings_guard: the manifests, parts and Ray Train
    checkpoints carry them, `config.yaml` is not needed), then record the settings in `config.yaml`."""
    import yaml

    from transfgu_dist.pipeline import settings_guard

    settings_guard.check(cfg, stages)
    uri = storage.join(cfg.output, "config.yaml")
    new = to_dict(cfg)
    if storage.exists(uri):
        try:
            old = yaml.safe_load(storage.read_bytes(uri))
        except yaml.YAMLError as e:
            raise ConfigError(
                f"{uri}: expected the YAML settings this output was made with, could not parse it "
                f"({str(e).splitlines()[0]}); restore or delete it"
            ) from None
        if not isinstance(old, dict):
            raise ConfigError(f"{uri}: expected a mapping of config sections, got {type(old).__name__}")
        # a job of some stages records only its own settings: other committed stages keep theirs
        for stage in set(STAGES) - set(stages):
            if contract.is_committed(cfg, stage):
                new.update({section: old[section] for section in STAGES[stage].inputs if section in old})
    storage.write_bytes(uri, yaml.safe_dump(new, sort_keys=False).encode())


def log_stage(result: StageResult, seconds: float) -> None:
    """A stage's figures, tags, manifest and result files (as its contract declares) into the active MLflow run."""
    import mlflow

    stage = STAGES[result.stage]
    mlflow.log_metrics({"wall_seconds": seconds, **result.metrics})
    mlflow.set_tags(result.tags)
    if stage.log_manifest:
        mlflow.log_dict(result.manifest, f"{stage.name}_manifest.json")
    if stage.log_files:
        from transfgu_dist.pipeline import tracking

        tracking.log_outputs(result.uri, stage.name)


def run_summary(results: dict[str, StageResult], timings: dict[str, float]) -> dict[str, float]:
    """The parent run's metrics: wall time, final mIoU and pixel accuracy, the results table's figures, best and
    last epoch's val mIoU."""
    out = {"wall_seconds": sum(timings.values())}
    if "evaluate" in results:
        kept = {k: v for k, v in results["evaluate"].metrics.items() if k in ("miou", "pixel_accuracy")}
        out.update({**kept, **{k: v for k, v in results["evaluate"].metrics.items() if k.startswith("table/")}})
    epoch = results["bootstrap"].manifest.get("metrics") or {} if "bootstrap" in results else {}
    if "best/val/miou" in epoch and "val/miou" in epoch:
        out.update(
            {
                "best/val/miou": epoch["best/val/miou"],
                "best/global_epoch": epoch["best/global_epoch"],
                "last/val/miou": epoch["val/miou"],
            }
        )
    return out


def ask_for_token_auth(address: str | None) -> None:
    """A local Ray started here gets token authentication, as Ray's default gives it, but asked for
    (RAY_AUTH_MODE=token unless set), so Ray does not warn on the console that it chose it. RAY_AUTH_MODE=disabled
    opts out as with Ray itself; a cluster joined (address, RAY_ADDRESS) keeps its own mode. Before Ray is imported:
    Ray reads the variable once."""
    if address is None and "RAY_ADDRESS" not in os.environ:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def log_model(cfg: Config, results: dict[str, StageResult]) -> str:
    """The trained Segmenter (the checkpoint evaluate scored, with its matching; else final.pt; without labels the
    raw clusters) as an MLflow pyfunc model (export.log_mlflow_model) on the active run; returns its model URI."""
    from transfgu_dist.inference.export import log_mlflow_model
    from transfgu_dist.inference.segmenter import Segmenter

    evaluated = results.get("evaluate")
    final = storage.join(results["bootstrap"].uri, results["bootstrap"].manifest["final"])
    from transfgu_dist.pipeline.stages.evaluate import scored_checkpoint

    scored = evaluated and evaluated.manifest["metrics"].get("scored", True)
    checkpoint = scored_checkpoint(cfg, evaluated.manifest["metrics"]["checkpoint"]) if evaluated else final
    metrics = storage.join(evaluated.uri, "metrics.json") if scored else None
    return log_mlflow_model(Segmenter.from_checkpoint(checkpoint, cfg, metrics=metrics))


def run_stages(
    cfg: Config, stages: Sequence[str], weights: str, results: dict, timings: dict, failure: Reported
) -> tuple[dict, str | None]:
    """The stages in order in a parent MLflow run, one nested run each (`results`, `timings` filled as they end;
    `failure.stage` names the stage running); returns the parent run's summary metrics and its model URI."""
    import mlflow

    from transfgu_dist.pipeline import tracking

    tracking.close_orphans(cfg)
    with tracking.run(cfg, "+".join(stages) if len(stages) < 5 else "run_all"):
        mlflow.set_tag("weights", weights)
        for name in stages:
            failure.stage = name
            with tracking.run(cfg, name, nested=True, sections=STAGES[name].inputs) as active:
                start = time.perf_counter()
                log.info("stage %s: starting (output %s)", name, cfg.output)
                kwargs = (
                    {"mlflow_run": (tracking.tracking_uri(cfg), active.info.run_id)}
                    if STAGES[name].epoch_metrics
                    else {}
                )
                results[name] = _stage(name)(cfg, **kwargs)
                timings[name] = round(time.perf_counter() - start, 1)
                log_stage(results[name], timings[name])
            log.info("stage %s: done in %.1f s", name, timings[name])
        summary = run_summary(results, timings)
        mlflow.log_metrics(summary)
        return summary, log_model(cfg, results) if "bootstrap" in results else None


def run(stages: Sequence[str], description: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line, start or join Ray, run `stages` in order (committed ones are skipped)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(description, argv)
    if not args.verbose:
        logging.getLogger("timm").setLevel(logging.WARNING)  # "Loading pretrained weights from ..." (preflight)
        ask_for_token_auth(args.address)
    cfg, weights = preflight(args, stages)
    from transfgu_dist.pipeline import (
        tracking,  # before Ray: MLflow sets up its loggers on import, init_ray quiets them
    )

    results: dict[str, StageResult] = {}
    timings: dict[str, float] = {}

    def kept() -> str:
        committed = [n for n in stages if contract.is_committed(cfg, n)]
        done = f"the committed stages ({', '.join(committed)})" if committed else "no committed stage"
        return f"{done} and the finished parts of the next, under {cfg.output}"

    from transfgu_dist.pipeline.seeds import SEEDED, run_seeds

    seeded = cfg.seeds > 1 and "bootstrap" in stages  # the seeded stages run per seed, after the others
    once = [s for s in stages if not (seeded and s in SEEDED)]
    with (
        Reported(args.debug) as failure,
        ctrl_c(kept, argv, lambda: tracking.close_orphans(cfg, quiet=True)),
        ray_console(args),
    ):
        summary, model_uri = run_stages(cfg, once, weights, results, timings, failure) if once else ({}, None)
        failure.stage = "seeds"
        seeds = run_seeds(cfg) if seeded else None
    from transfgu_dist.pipeline.summary import print_summary

    print_summary(cfg, results, timings, summary, model_uri, seeds)
    return {"config": cfg, "results": results, "timings": timings, "seeds": seeds}
