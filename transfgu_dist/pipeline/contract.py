"""The stage contract: each stage's folder, manifest and config inputs declared once, and the result every stage
returns. The command line, the settings guard (transfgu_dist.pipeline.settings_guard) and the stages all read it, for
`output` and `source` alike. Imports neither Ray nor torch (`--help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transfgu_dist.config import Config
from transfgu_dist.io import storage
from transfgu_dist.io.stage_output import StageOutput


@dataclass(frozen=True)
class Stage:
    """A stage of the pipeline, in run order.

    folder: its output folder; under the inputs root (`source` when reused, else `output`) for the label-free
    stages, else under `output`. inputs: the config sections (`crops`), keys (`eval.image_size`) or top-level
    keys (`seed`) its output depends on, besides its upstream stages' (a resume with other values would mix results)."""

    name: str
    folder: str
    inputs: tuple[str, ...]
    reusable: bool = False  # lives under the inputs root: a later run can reuse it through `source=`
    log_manifest: bool = False  # the manifest goes to MLflow as <name>_manifest.json
    log_files: bool = False  # the folder's result files go to MLflow as artifacts
    epoch_metrics: bool = False  # the run function takes mlflow_run=(tracking URI, run id) for per-epoch metrics


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("extract", "features", ("seed", "data", "encoder", "crops"), reusable=True),  # seed: synthetic data
        Stage("cluster", "concepts", ("cluster",), reusable=True),
        Stage("pseudo_label", "bank", ("pseudo",), reusable=True),
        # validation during training scores at eval.image_size and eval.precision: best.pt depends on them
        Stage(
            "bootstrap",
            "bootstrap",
            ("decoder", "loss", "train", "eval.image_size", "eval.precision"),
            log_manifest=True,
            epoch_metrics=True,
        ),
        Stage("evaluate", "evaluate", ("eval", "probe"), log_files=True),
    )
}

# Settings that change how fast a stage runs, or where it reads from, not what it writes (tests/test_reliability_runs.py
# runs each at another value). Not among them: pseudo.batch_size and pseudo.images_per_part (the reference's Grad-CAM
# loss is a mean over a batch of pseudo.batch_size images of one part, so they change the bank), the crops batch
# and part sizes (other encoder batch shapes change the crop features by up to 1e-6 on CPU) and train.num_workers
# (each worker trains on its shard with its own augmentation stream).
RESOURCE_KEYS = {
    "train.cpus_per_worker",
    "train.use_gpu",
    "train.max_failures",
    "eval.batch_size",
    "eval.checkpoint",
    "eval.crf",
}  # these pick another output folder (folder_uri)


def input_values(config: dict[str, Any], name: str, with_upstream: bool = False) -> dict[str, Any]:
    """`section.key` -> value of the stage's inputs (with its upstream stages' too) in a `config.to_dict`,
    resource keys left out."""
    names = [*upstream(name), name] if with_upstream else [name]
    flat = {k: v for k, v in config.items() if not isinstance(v, dict)}
    flat.update(
        {
            f"{section}.{k}": v
            for section, values in config.items()
            if isinstance(values, dict)
            for k, v in values.items()
        }
    )
    wanted = [i for n in names for i in STAGES[n].inputs]
    return {k: v for k, v in flat.items() if k not in RESOURCE_KEYS and (k in wanted or k.split(".")[0] in wanted)}


def upstream(name: str) -> list[str]:
    """The stages whose outputs `name` reads, directly or not, in run order."""
    order = list(STAGES)
    return order[: order.index(name)]


def folder_uri(cfg: Config, name: str) -> str:
    """The stage's output folder. Evaluate: `<output>/evaluate` for final.pt, `<output>/evaluate-<name>` for any
    other checkpoint (`eval.checkpoint`), `-crf` appended with eval.crf (kept apart)."""
    stage = STAGES[name]
    if name == "evaluate":
        checkpoint = cfg.eval.checkpoint.rstrip("/").rsplit("/", 1)[-1].removesuffix(".pt")
        suffix = "-".join(n for n in (checkpoint, "crf" if cfg.eval.crf else "") if n)
        return storage.join(cfg.output, f"evaluate-{suffix}" if suffix else "evaluate")
    return storage.join(cfg.inputs_root if stage.reusable else cfg.output, stage.folder)


def output(cfg: Config, name: str) -> StageOutput:
    return StageOutput(folder_uri(cfg, name))


def is_committed(cfg: Config, name: str) -> bool:
    return output(cfg, name).is_committed()


@dataclass
class StageResult:
    """What every stage returns. manifest: the committed manifest; processed: the units (images, epochs) this run
    computed, 0 when the stage was committed already; metrics and tags: what MLflow records of it."""

    stage: str
    uri: str
    manifest: dict[str, Any]
    processed: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
