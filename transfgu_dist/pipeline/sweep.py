"""Ray Tune sweeps over alpha, omega1, omega2 and T_bg (Eqs 8, 13, 16) on an existing pseudo-label bank.

Each trial is a shortened bootstrap (a Ray Train TorchTrainer nested in the trial) reusing the `source` run's
features, concepts and bank; T_bg is applied when labels are loaded, so no trial recomputes anything upstream.
Trials report val mIoU per epoch, ASHA stops the weak ones, and every trial is an MLflow run nested under the
sweep's run. A sweep whose driver died resumes with `Tuner.restore` without rerunning finished trials.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback

from transfgu_dist.config import Config, ConfigError, dump_yaml, load_yaml, set_key, worker_range
from transfgu_dist.io import storage
from transfgu_dist.pipeline import tracking
from transfgu_dist.pipeline.ray_setup import fit
from transfgu_dist.pipeline.training_data import build_cache

log = logging.getLogger(__name__)

TUNABLE = ("loss.alpha", "loss.omega1", "loss.omega2", "loss.t_bg", "train.lr", "train.round_epochs")
DISTRIBUTIONS = {
    "uniform": tune.uniform,
    "loguniform": tune.loguniform,
    "randint": tune.randint,
    "choice": tune.choice,
    "grid": tune.grid_search,
}
SEARCHERS = ("random", "grid", "optuna", "hyperopt")


@dataclass
class SweepSpec:
    """A search-space file (tune_spaces/*.yaml)."""

    path: str
    preset: str
    space: dict[str, Any]  # param -> Tune domain
    raw_space: dict[str, dict[str, list]]  # param -> {distribution: args}, as written
    trial: dict[str, Any] = field(default_factory=dict)  # overrides that shorten each trial
    algorithm: str = "random"
    num_samples: int = 4
    max_concurrent_trials: int = 1
    metric: str = "val/miou"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: int = 2
    trial_cpus: float = 0.1  # the trial driver; its Train workers ask for their own


def _domain(path: str, key: str, spec: Any) -> Any:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{path}: key 'space.{key}': expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}")
    ((kind, args),) = spec.items()
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{path}: key 'space.{key}': {kind} needs a non-empty list of values")
        return DISTRIBUTIONS[kind](args)
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
        raise ConfigError(f"{path}: key 'space.{key}': {kind} needs [low, high]")
    low, high = args
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"{path}: key 'space.{key}': empty range [{low}, {high}]")
    return DISTRIBUTIONS[kind](low, high)


def load_spec(path: str | Path) -> SweepSpec:
    """Parse and validate a search-space file; a bad key or range is named with the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space {p} does not exist (expected a YAML file like tune_spaces/synthetic.yaml)")
    doc = load_yaml(p.read_text(), str(p)) or {}
    unknown = set(doc) - {"preset", "trial", "space", "search"}
    if unknown:
        raise ConfigError(f"{p}: unknown key '{sorted(unknown)[0]}' (known: preset, trial, space, search)")
    raw = doc.get("space") or {}
    if not raw:
        raise ConfigError(f"{p}: key 'space' is empty: nothing to search")
    for key in raw:
        if key not in TUNABLE:
            raise ConfigError(f"{p}: unknown parameter 'space.{key}' (tunable: {', '.join(TUNABLE)})")
    search = dict(doc.get("search") or {})
    known = {f for f in SweepSpec.__dataclass_fields__} - {"path", "preset", "space", "raw_space", "trial"}
    for key in search:
        if key not in known:
            raise ConfigError(f"{p}: unknown key 'search.{key}' (known: {', '.join(sorted(known))})")
    spec = SweepSpec(
        path=str(p),
        preset=doc.get("preset", "synthetic"),
        space={k: _domain(str(p), k, v) for k, v in raw.items()},
        raw_space=raw,
        trial=dict(doc.get("trial") or {}),
        **search,
    )
    if spec.algorithm not in SEARCHERS:
        raise ConfigError(f"{p}: key 'search.algorithm' = {spec.algorithm!r}: expected one of {', '.join(SEARCHERS)}")
    return spec


def with_params(cfg: Config, params: dict[str, Any], where: str) -> Config:
    out = copy.deepcopy(cfg)
    for key, value in params.items():
        set_key(out, key, value, where)
    return out


def run_trial(params: dict[str, Any], base: Config, sweep_output: str) -> None:
    """One trial: a shortened bootstrap from the source bank, val metrics reported to Tune every epoch."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from transfgu_dist.pipeline.stages.bootstrap import make_trainer

    name = tune.get_context().get_trial_id()
    cfg = with_params(base, params, f"trial {name}")
    cfg.output = storage.join(sweep_output, "trials", name)
    done = storage.join(cfg.output, "trial.json")
    if storage.exists(done):
        # finished before the driver died but not yet recorded by Tune: report the stored result, train nothing
        metrics = storage.read_json(done)["metrics"]
        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        return
    result = make_trainer(cfg, "bootstrap", callbacks=[TuneReportCallback()]).fit()
    storage.write_json(done, {"params": params, "metrics": result.metrics})


class TrialRuns(MLflowLoggerCallback):
    """Ray's MLflow logger with every trial nested under the sweep's run, and one run per trial across
    `Tuner.restore`: a trial that Tune restarts continues its earlier run instead of opening a second one."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str):
        super().__init__(uri, experiment_name=experiment, tags={"mlflow.parentRunId": parent_run_id})
        self.parent_run_id = parent_run_id

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            earlier = MlflowClient(self.tracking_uri).search_runs(
                [self.mlflow_util.experiment_id],
                f"tags.trial_name = '{trial}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
                max_results=1,
            )
            if earlier:
                self._trial_runs[trial] = earlier[0].info.run_id
        super().log_trial_start(trial)


def _searcher(spec: SweepSpec):
    if spec.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch()
    if spec.algorithm == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch()
    return None  # random and grid: Tune's basic variant generator


def run_sweep(spec: SweepSpec, base: Config, trial_base: Config, sweep_output: str) -> dict[str, Any]:
    """Run (or resume) the sweep; write `best.yaml`, a full run config with the best parameters."""
    import ray

    per_trial = spec.trial_cpus + worker_range(trial_base.train.num_workers)[1] * trial_base.train.cpus_per_worker
    if spec.max_concurrent_trials * per_trial > ray.cluster_resources().get("CPU", 0) - 1:
        log.warning(
            "%d concurrent trials x %.1f CPUs leave less than one CPU for the Ray Data tasks that feed them: "
            "trials may wait forever; lower search.max_concurrent_trials or train.cpus_per_worker",
            spec.max_concurrent_trials,
            per_trial,
        )
    path, fs = storage.ray_storage(sweep_output)
    build_cache(trial_base)  # the source's decoded training images, once, before the trials read them
    experiment = storage.join(sweep_output, "tune")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=trial_base, sweep_output=sweep_output), {"cpu": spec.trial_cpus}
    )
    parent_uri = storage.join(sweep_output, "mlflow_parent.json")
    parent = storage.read_json(parent_uri)["run_id"] if storage.exists(parent_uri) else None
    with tracking.run(base, "sweep", run_id=parent) as active:
        storage.write_json(parent_uri, {"run_id": active.info.run_id})
        mlflow_cb = TrialRuns(tracking.tracking_uri(base), base.experiment, active.info.run_id)
        if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
            tuner = tune.Tuner.restore(
                experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
            )
        else:
            # max_t past the last epoch: a trial that trains to the end returns by itself (and writes trial.json);
            # a grace period at or past max_t means no early stopping
            max_t = sum(trial_base.train.round_epochs) + 1
            scheduler = tune.schedulers.ASHAScheduler(
                max_t=max_t, grace_period=min(spec.grace_period, max_t), reduction_factor=spec.reduction_factor
            )
            tuner = tune.Tuner(
                trainable,
                param_space=spec.space,
                tune_config=tune.TuneConfig(
                    metric=spec.metric,
                    mode=spec.mode,
                    num_samples=spec.num_samples,
                    max_concurrent_trials=spec.max_concurrent_trials,
                    scheduler=scheduler,
                    search_alg=_searcher(spec),
                ),
                run_config=tune.RunConfig(name="tune", storage_path=path, storage_filesystem=fs, callbacks=[mlflow_cb]),
            )
        results = fit(tuner)
        if len(results.errors) == len(results):
            raise RuntimeError(f"all {len(results)} trials failed; the first: {results.errors[0]}")
        best = results.get_best_result(spec.metric, spec.mode, scope="all")
        best_cfg = with_params(base, best.config, "best trial")
        best_cfg.output = storage.join(sweep_output, "best")
        storage.write_bytes(storage.join(sweep_output, "best.yaml"), dump_yaml(best_cfg).encode())
        summary = {
            "best_params": best.config,
            "best_metrics": {k: v for k, v in best.metrics.items() if isinstance(v, (int, float))},
            "trials": len(results),
            "errors": len(results.errors),
        }
        import mlflow

        mlflow.log_dict(summary, "sweep_summary.json")
        mlflow.log_metric("best_" + spec.metric.replace("/", "_"), summary["best_metrics"].get(spec.metric, 0.0))
    return summary
