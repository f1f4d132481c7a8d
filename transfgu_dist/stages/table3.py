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
import ray
import torch

from transfgu_dist import bank, parts, storage
from transfgu_dist.config import Config
from transfgu_dist.datasets import Sample, list_samples
from transfgu_dist.label_maps import table_name
from transfgu_dist.metrics import confusion_matrix, scores_from_confusion
from transfgu_dist.resizing import resizing
from transfgu_dist.segmenter import load_decoder
from transfgu_dist.stages.cluster import load_concepts
from transfgu_dist.stages.common import actor_pool
from transfgu_dist.stages.evaluate import IGNORE, Predictor, load_labeled_images, val_dataset
from transfgu_dist.stages.pseudo_label import bank_output
from transfgu_dist.targets import hard_labels, soft_targets


def bank_confusion(batch: dict[str, np.ndarray], cfg: Config, is_fg: np.ndarray | None,
                   labels: dict[str, str]) -> dict[str, np.ndarray]:
    """Ray Data CPU task: conf[gt, pseudo label] of the bank rows with a GT label (`labels`: id -> URI), at the
    eval size."""
    keep = np.isin(batch["image_id"], list(labels))
    batch = {k: v[keep] for k, v in batch.items()}
    batch["label"] = np.array([labels[i] for i in batch["image_id"]], dtype=object)
    size = tuple(cfg.eval.image_size)
    if not keep.any():
        return {"confusion": np.zeros((1, cfg.data.n_classes, cfg.n_outputs), np.int64)}
    batch = load_labeled_images(batch, size, table_name(cfg.data.layout, cfg.data.n_classes), resizing(cfg.data))
    n, (h, w) = len(batch["ok"]), batch["grid"][0]
    maps = bank.decode(torch.from_numpy(np.stack(batch["shared"]).reshape(n, h, w)),
                       torch.from_numpy(np.stack(batch["terms"]).reshape(n, -1, h, w)),
                       torch.from_numpy(np.asarray(batch["scale"])))
    fg = torch.from_numpy(np.stack(batch["fg_prior"]).reshape(n, h, w))
    loss = cfg.loss
    scores = soft_targets(maps, norm=loss.label_norm, t_bg=loss.t_bg if loss.background_channel else None,
                          fg_prior=fg if is_fg is not None else None,
                          is_fg=torch.from_numpy(is_fg) if is_fg is not None else None)
    pred = hard_labels(scores, size).numpy()
    return {"confusion": confusion_matrix(batch["gt"], pred, cfg.data.n_classes, scores.shape[1], IGNORE)[None]}


def pseudo_label_miou(cfg: Config) -> float | None:
    """mIoU of the bank's argmax on the training images with ground truth (None: no bank or no such image)."""
    out = bank_output(cfg)
    if not out.is_committed():  # e.g. a decoder scored on a val-only dataset
        return None
    labels = {s.image_id: s.label for s in list_samples(cfg, cfg.data.train_split) if s.label}
    if not labels:
        return None
    is_fg = load_concepts(cfg).is_fg
    split = cfg.pseudo.split_fg_bg and 0 < int(is_fg.sum()) < len(is_fg)  # as the Bootstrapper decides
    uris = parts.part_uris(out)
    bank.check_part(uris[0])
    fs, _ = storage.filesystem(uris[0])
    ray.data.DataContext.get_current().use_datasource_v2 = False
    ds = ray.data.read_parquet([storage.filesystem(u)[1] for u in uris], filesystem=fs)
    rows = ds.map_batches(bank_confusion, fn_kwargs={"cfg": cfg, "is_fg": is_fg if split else None, "labels": labels},
                          batch_size=cfg.eval.batch_size, num_cpus=1).take_all()
    return scores_from_confusion(sum(r["confusion"] for r in rows)).miou


def student_miou(cfg: Config, checkpoint: str, samples: list[Sample]) -> float:
    """Validation mIoU of the decoder at `checkpoint`, scored as evaluate scores (one matching over the split)."""
    ds = val_dataset(cfg, samples).map_batches(
        Predictor, fn_constructor_kwargs={"cfg": cfg, "decoder": load_decoder(checkpoint, cfg),
                                          "overlay_ids": frozenset()},
        batch_size=cfg.eval.batch_size, **actor_pool())
    return scores_from_confusion(sum(r["confusion"] for r in ds.take_all())).miou


def table3(cfg: Config, samples: list[Sample], student: float) -> dict[str, Any]:
    """{pseudo_labels, round0_student, student} mIoU (None where it cannot be scored), for metrics.json."""
    round0 = storage.join(cfg.output, "bootstrap", "round-0.pt")
    return {"pseudo_labels": pseudo_label_miou(cfg),
            "round0_student": student_miou(cfg, round0, samples) if storage.exists(round0) else None,
            "student": student}


def table3_line(t: dict[str, Any]) -> str:
    """One console line, e.g. `Table 3 mIoU: pseudo labels 8.95 -> round-0 student 13.19 -> student 16.19`."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"
    return (f"Table 3 mIoU: pseudo labels {pct(t['pseudo_labels'])} (train images) -> round-0 student "
            f"{pct(t['round0_student'])} -> student {pct(t['student'])}")
