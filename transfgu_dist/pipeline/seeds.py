"""Several seeds of one run (`seeds` > 1): bootstrap and evaluate once per seed, in parallel as Ray Tune trials,
on the features, concepts and pseudo-label bank the run made once; the results table as mean ± sample std.

Why from bootstrap on: extract is deterministic and the bank (Grad-CAM over the whole training split, the costliest
stage) follows from the concepts, so every seed reuses them; the seed moves what bootstrapping draws (the decoder's
initialisation, the shuffle order, the augmentations: train.seed) and the linear probe's initialisation
(probe.seed). Seed i (0..seeds-1) runs with train.seed + i and probe.seed + i in `<output>/seeds/seed-<train.seed>`
(an output whose `source` is the run's), so a finished seed is committed and a rerun resumes the others.

MLflow: a top-level run `seeds` with the aggregate (table/<row>/<figure>/{mean,std}) and one nested run per seed
with that seed's table (table/<row>/<figure>).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import mlflow
from ray import tune

from transfgu_dist.config import Config, worker_range
from transfgu_dist.io import storage
from transfgu_dist.pipeline import settings_guard, tracking
from transfgu_dist.pipeline.ray_setup import fit
from transfgu_dist.pipeline.results_table import aggregate, aggregate_metrics, markdown, table_metrics
from transfgu_dist.pipeline.training_data import build_cache

SEEDED = ("bootstrap", "evaluate")  # the stages run once per seed
TRIAL_CPUS = 0.1  # a seed's trial driver; its Train workers and Ray Data tasks ask for their own
log = logging.getLogger(__name__)


def seed_config(cfg: Config, i: int) -> Config:
    """The config of the run's i-th seed."""
    out = copy.deepcopy(cfg)
    out.train.seed, out.probe.seed, out.seeds = cfg.train.seed + i, cfg.probe.seed + i, 1
    out.source, out.output = cfg.inputs_root, storage.join(cfg.output, "seeds", f"seed-{out.train.seed}")
    return out


def seed_stages(cfg: Config) -> dict[str, float]:
    """Bootstrap and evaluate of one seed's config; its evaluate metrics."""
    from transfgu_dist.pipeline.stages.bootstrap import run_bootstrap
    from transfgu_dist.pipeline.stages.evaluate import run_evaluate

    settings_guard.check(cfg, list(SEEDED))
    run_bootstrap(cfg)
    return run_evaluate(cfg).metrics


def run_seed(params: dict[str, Any], base: Config) -> None:
    """Tune trainable: the stages of seed `params["i"]` in a task outside the trial's placement group (their Ray
    Data and Ray Train work asks for its own resources, as in a run); reports its evaluate metrics."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cfg = seed_config(base, params["i"])
    free = PlacementGroupSchedulingStrategy(placement_group=None)
    task = ray.remote(seed_stages).options(num_cpus=0, scheduling_strategy=free)
    tune.report({"train_seed": cfg.train.seed, **ray.get(task.remote(cfg))})


def run_seeds(cfg: Config) -> dict[str, Any]:
    """Run (or resume) the seeds in parallel; write `<output>/seeds/{metrics.json, results_table.md}` (per-seed
    tables and their aggregate) and log them to MLflow; returns metrics.json's content."""
    import ray

    per_seed = TRIAL_CPUS + cfg.train.cpus_per_worker * worker_range(cfg.train.num_workers)[1]
    if cfg.seeds * per_seed > ray.cluster_resources().get("CPU", 0) - 1:
        log.warning(
            "%d seeds x %.2f CPUs leave less than one CPU for the Ray Data tasks that feed them: seeds may wait "
            "forever; lower train.cpus_per_worker or add nodes",
            cfg.seeds,
            per_seed,
        )
    folder = storage.join(cfg.output, "seeds")
    path, fs = storage.ray_storage(folder)
    build_cache(cfg)  # once, before the seeds read it in parallel
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_seed, base=cfg), {"cpu": TRIAL_CPUS}),
        param_space={"i": tune.grid_search(list(range(cfg.seeds)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.seeds),
        run_config=tune.RunConfig(name="tune", storage_path=path, storage_filesystem=fs),
    )
    results = sorted(fit(tuner), key=lambda r: r.config["i"])
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {cfg.seeds} seeds failed; the first: {errors[0]}")
    configs = [seed_config(cfg, r.config["i"]) for r in results]
    tables = {
        c.train.seed: storage.read_json(storage.join(c.output, "evaluate", "metrics.json"))["results_table"]
        for c in configs
    }
    summary = {
        "seeds": list(tables),
        "std": "sample (n - 1)",
        "aggregate": aggregate(list(tables.values())),
        "per_seed": {str(s): t for s, t in tables.items()},
    }
    storage.write_json(storage.join(folder, "metrics.json"), summary)
    title = f"{cfg.output}: mean ± sample std over seeds {', '.join(map(str, tables))}"
    storage.write_bytes(storage.join(folder, "results_table.md"), markdown(summary["aggregate"], title).encode())
    with tracking.run(cfg, "seeds"):
        mlflow.log_metrics(aggregate_metrics(summary["aggregate"]))
        mlflow.log_dict(summary, "seeds_metrics.json")
        for c in configs:
            with tracking.run(c, f"seed-{c.train.seed}", nested=True):
                mlflow.log_metrics(table_metrics(tables[c.train.seed]))
    return summary
