"""The paper's Table 3 beside evaluate's score: initial pseudo labels -> round-0 student -> final student.

Paper Table 3 (COCO-S-27): pseudo labels 8.95, without bootstrapping 13.19, with 16.19 mIoU. Here:
- pseudo labels: the argmax of the bank's soft targets (as training makes them: Eq. 8 / min-max, the fg/bg split),
  nearest-upsampled to eval.image_size and scored, with their own Hungarian matching, on the TRAINING images
  that have ground truth (the bank covers the training split only); None when none has;
- round-0 student: bootstrap/round-0.pt (Eq. 9 only, no teacher) on the validation split, as evaluate scores;
- student: evaluate's own checkpoint (final.pt unless eval.checkpoint says otherwise).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from transfgu_dist.config import Config
from transfgu_dist.inference.segmenter import load_decoder
from transfgu_dist.io import bank, storage
from transfgu_dist.io.concepts_file import load_concepts
from transfgu_dist.io.datasets import Sample, image_uri, list_samples
from transfgu_dist.io.image_pool import actor_pool
from transfgu_dist.io.label_maps import IGNORE, table_name
from transfgu_dist.method.metrics import confusion_matrix, scores_from_confusion
from transfgu_dist.method.resizing import resizing
from transfgu_dist.method.targets import fg_bg_split, hard_labels, label_scores
from transfgu_dist.pipeline import contract
from transfgu_dist.pipeline.scoring import Predictor, load_labeled_images, val_dataset


def bank_confusion(
    batch: dict[str, np.ndarray], cfg: Config, is_fg: np.ndarray | None, labels: dict[str, str]
) -> dict[str, np.ndarray]:
    """Ray Data CPU task: conf[gt, pseudo label] of the bank rows with a GT label (`labels`: id -> URI), at the
    eval size."""
    keep = np.isin(batch["image_id"], list(labels))
    batch = {k: v[keep] for k, v in batch.items()}
    batch["label"] = np.array([labels[i] for i in batch["image_id"]], dtype=object)
    batch["uri"] = np.array([image_uri(cfg, p) for p in batch["path"]], dtype=object)
    size = tuple(cfg.eval.image_size)
    if not keep.any():
        return {"confusion": np.zeros((1, cfg.data.n_classes, cfg.n_outputs), np.int64)}
    batch = load_labeled_images(batch, size, table_name(cfg.data.layout, cfg.data.n_classes), resizing(cfg.data))
    rows = {k: torch.from_numpy(v) for k, v in bank.unpack(batch).items()}
    maps = bank.decode(rows["shared"], rows["terms"], rows["scale"])
    scores = label_scores(maps, rows["fg_prior"], None if is_fg is None else torch.from_numpy(is_fg), cfg.loss)
    pred = hard_labels(scores, size).numpy()
    return {"confusion": confusion_matrix(batch["gt"], pred, cfg.data.n_classes, scores.shape[1], IGNORE)[None]}


def pseudo_label_miou(cfg: Config) -> float | None:
    """mIoU of the bank's argmax on the training images with ground truth (None: no bank or no such image)."""
    out = contract.output(cfg, "pseudo_label")
    if not out.is_committed():  # e.g. a decoder scored on a val-only dataset
        return None
    labels = {s.image_id: s.label for s in list_samples(cfg, cfg.data.train_split) if s.label}
    if not labels:
        return None
    is_fg = fg_bg_split(cfg.pseudo.split_fg_bg, load_concepts(contract.output(cfg, "cluster")).is_fg)
    rows = (
        bank.read(out, cfg.pseudo.terms_dtype)
        .map_batches(
            bank_confusion,
            fn_kwargs={"cfg": cfg, "is_fg": is_fg, "labels": labels},
            batch_size=cfg.eval.batch_size,
            num_cpus=1,
        )
        .take_all()
    )
    return scores_from_confusion(sum(r["confusion"] for r in rows)).miou


def student_miou(cfg: Config, checkpoint: str, samples: list[Sample]) -> float:
    """Validation mIoU of the decoder at `checkpoint`, scored as evaluate scores (one matching over the split)."""
    ds = val_dataset(cfg, samples).map_batches(
        Predictor,
        fn_constructor_kwargs={"cfg": cfg, "decoder": load_decoder(checkpoint, cfg), "overlay_ids": frozenset()},
        batch_size=cfg.eval.batch_size,
        **actor_pool(cfg.resources),
    )
    return scores_from_confusion(sum(r["confusion"] for r in ds.take_all())).miou


def table3(cfg: Config, samples: list[Sample], student: float) -> dict[str, Any]:
    """{pseudo_labels, round0_student, student} mIoU (None where it cannot be scored), for metrics.json."""
    round0 = storage.join(cfg.output, "bootstrap", "round-0.pt")
    return {
        "pseudo_labels": pseudo_label_miou(cfg),
        "round0_student": student_miou(cfg, round0, samples) if storage.exists(round0) else None,
        "student": student,
    }


def table3_line(t: dict[str, Any]) -> str:
    """One console line, e.g. `Table 3 mIoU: pseudo labels 8.95 -> round-0 student 13.19 -> student 16.19`."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    return (
        f"Table 3 mIoU: pseudo labels {pct(t['pseudo_labels'])} (train images) -> round-0 student "
        f"{pct(t['round0_student'])} -> student {pct(t['student'])}"
    )
