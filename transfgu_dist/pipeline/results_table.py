"""The results table of a labelled run, in one pass over the val split: mIoU and pixel accuracy (paper sec 4.1,
one Hungarian matching over the split, method.metrics) of the final checkpoint and of the best-on-val one, each
without and with the dense CRF (method.crf), plus the linear probe's rows when it was trained (probe.enabled).

Row order says which protocol a figure belongs to: the final checkpoint without CRF first (no label picks it: the
label-free protocol), then the authors' protocol (the epoch with the best val score, picked with val labels), then
the supervised linear probe (scored with the identity matching: its outputs are classes). Every row is scored as
evaluate scores one checkpoint (scoring.Predictor): images and labels at eval.image_size, logits upsampled
bilinearly, the CRF on the upsampled logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from transfgu_dist.config import Config
from transfgu_dist.inference.segmenter import cluster_logits, pixel_labels
from transfgu_dist.io.datasets import Sample
from transfgu_dist.io.image_pool import actor_device, actor_pool, images_to_device
from transfgu_dist.io.label_maps import IGNORE
from transfgu_dist.io.weights import build_encoder
from transfgu_dist.method.crf import CRFConfig
from transfgu_dist.method.metrics import confusion_matrix, scores_from_confusion
from transfgu_dist.pipeline.scoring import val_dataset


@dataclass(frozen=True)
class Row:
    key: str  # MLflow metrics table/<key>/miou and table/<key>/pixel_accuracy
    model: str  # final | best | linear
    crf: bool
    protocol: str


ROWS = (
    Row("final", "final", False, "label-free: final checkpoint (no label picks it)"),
    Row("final_crf", "final", True, "label-free: final checkpoint, CRF"),
    Row("best", "best", False, "authors' protocol: best epoch on val labels"),
    Row("best_crf", "best", True, "authors' protocol: best epoch on val labels, CRF"),
    Row("linear", "linear", False, "SUPERVISED linear probe (train labels, frozen encoder)"),
    Row("linear_crf", "linear", True, "SUPERVISED linear probe (train labels, frozen encoder), CRF"),
)
SUPERVISED = frozenset({"linear"})  # scored with the identity matching


class TablePredictor:
    """Ray Data actor: one row per batch with conf[gt, output] of every model without (`<model>`) and with
    (`<model>_crf`) the CRF; the encoder runs once per model and batch, the CRF on the same logits."""

    def __init__(self, cfg: Config, models: dict[str, nn.Module]):
        self.dev = actor_device()
        self.encoder = build_encoder(cfg.encoder).to(self.dev)
        self.models = {name: m.to(self.dev).eval() for name, m in models.items()}
        self.size, self.n_classes, self.precision = tuple(cfg.eval.image_size), cfg.data.n_classes, cfg.eval.precision

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, out = images_to_device(batch, self.dev), {}
        for name, model in self.models.items():
            logits = cluster_logits(self.encoder, model, images, self.precision)
            for suffix, crf in (("", None), ("_crf", CRFConfig())):
                pred = pixel_labels(logits, images, self.size, crf)
                out[name + suffix] = confusion_matrix(batch["gt"], pred, self.n_classes, model.n_outputs, IGNORE)[None]
        return out


def results_table(
    cfg: Config, samples: list[Sample], models: dict[str, nn.Module], checkpoints: dict[str, str]
) -> list[dict[str, Any]]:
    """The rows (ROWS order) of the models given (`final`, `best`, `linear`: those that exist), each
    {row, protocol, checkpoint, crf, miou, pixel_accuracy}; a figure that cannot be computed is None."""
    if not models:
        return []
    ds = val_dataset(cfg, samples).map_batches(
        TablePredictor,
        fn_constructor_kwargs={"cfg": cfg, "models": models},
        batch_size=cfg.eval.batch_size,
        **actor_pool(cfg.resources),
    )
    batches = ds.take_all()
    table = []
    for row in (r for r in ROWS if r.model in models):
        conf = sum(b[row.key] for b in batches)
        identity = np.arange(conf.shape[1]) if row.model in SUPERVISED else None
        s = scores_from_confusion(conf, identity).to_dict()
        table.append(
            {
                "row": row.key,
                "protocol": row.protocol,
                "checkpoint": checkpoints[row.model],
                "crf": row.crf,
                "miou": s["miou"],
                "pixel_accuracy": s["pixel_accuracy"],
            }
        )
    return table


def table_metrics(table: list[dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics `table/<row>/{miou,pixel_accuracy}`, those that exist (never NaN)."""
    return {f"table/{r['row']}/{k}": r[k] for r in table for k in ("miou", "pixel_accuracy") if r[k] is not None}


def aggregate(tables: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of several runs' tables (the same rows, e.g. one run per seed) with each figure replaced by
    {"mean", "std", "n"}: its mean and sample standard deviation (n - 1 in the denominator) over the runs where it
    is not None (std None below two)."""
    out = []
    for rows in zip(*tables, strict=True):
        figures = {}
        for k in ("miou", "pixel_accuracy"):
            values = np.array([r[k] for r in rows if r[k] is not None], dtype=np.float64)
            mean = float(values.mean()) if len(values) else None
            std = float(values.std(ddof=1)) if len(values) > 1 else None
            figures[k] = {"mean": mean, "std": std, "n": len(values)}
        out.append({**rows[0], **figures})
    return out


def aggregate_metrics(table: list[dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics `table/<row>/{miou,pixel_accuracy}/{mean,std}` of an aggregated table, those that exist."""
    return {
        f"table/{r['row']}/{k}/{stat}": r[k][stat]
        for r in table
        for k in ("miou", "pixel_accuracy")
        for stat in ("mean", "std")
        if r[k][stat] is not None
    }


def pct(v: float | dict[str, Any] | None) -> str:
    """A figure in percent; an aggregated one as `mean ± std`."""
    if isinstance(v, dict):
        return f"{pct(v['mean'])} ± {pct(v['std'])}"
    return "n/a" if v is None else f"{100 * v:.2f}"


def markdown(table: list[dict[str, Any]], title: str) -> str:
    """The table (or an aggregated one) in Markdown, figures in percent, under a `title` line."""
    return f"### {title}\n\n" + "\n".join(markdown_rows(table)) + "\n"


def markdown_rows(table: list[dict[str, Any]]) -> list[str]:
    """The Markdown table's lines: header, rule, one line per row."""
    lines = [
        "| # | protocol | checkpoint | CRF | mIoU | pixel accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(table, 1):
        crf = "yes" if r["crf"] else "no"
        lines.append(
            f"| {i} | {r['protocol']} | {r['checkpoint']} | {crf} | {pct(r['miou'])} | {pct(r['pixel_accuracy'])} |"
        )
    return lines
