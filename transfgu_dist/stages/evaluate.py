"""Evaluation stage: mIoU and pixel accuracy of the bootstrapped decoder on the whole validation split.

Paper sec 4.1: predicted cluster ids are aligned to the ground truth by Hungarian matching over all validation
images. Reference sec 7.1: images and labels (nearest) are resized to the protocol size and scored there; the
logits are upsampled bilinearly (align_corners=False) and argmaxed; ONE confusion matrix is accumulated over the
split and matched once.
"""
from __future__ import annotations

import json
import re
import logging
from typing import Any

import numpy as np
import ray

from transfgu_dist import contract, settings_guard, storage, synthetic
from transfgu_dist.config import Config
from transfgu_dist.contract import StageResult
from transfgu_dist.crf import CRFConfig
from transfgu_dist.resizing import ANTIALIAS, Resizing, resizing
from transfgu_dist.datasets import Sample, data_root, list_samples
from transfgu_dist.decoder import MaskTransformer
from transfgu_dist.encoder import build_encoder
from transfgu_dist.images import BadImageError, decode_label, resize_labels
from transfgu_dist.label_maps import class_names as table_class_names, remap_label, table_name
from transfgu_dist.metrics import confusion_matrix, scores_from_confusion
from transfgu_dist.segmenter import load_decoder, predict
from transfgu_dist.console import track
from transfgu_dist.stages.common import actor_device, actor_pool, images_to_device, list_bad_images, load_images
from transfgu_dist.storage import StageOutput
from transfgu_dist.viz import confusion_matrix_png, overlay_panel, per_class_iou_png

log = logging.getLogger(__name__)

IGNORE = 255  # ground-truth value that is not scored (reference sec 7.1: mapped to -1)


def default_checkpoint(cfg: Config) -> str:
    """`eval.checkpoint`: "" -> bootstrap/final.pt, "best" -> bootstrap/best.pt, else the URI itself."""
    name = {"": "final.pt", "best": "best.pt"}.get(cfg.eval.checkpoint)
    return storage.join(cfg.output, "bootstrap", name) if name else cfg.eval.checkpoint


def class_names(cfg: Config) -> list[str]:
    """Ground-truth class names: the synthetic ones, `<data root>/classes.txt` (one a line), the label table's
    (label_maps), else `class_<i>`."""
    n = cfg.data.n_classes
    source = storage.join(data_root(cfg), "classes.txt")
    if cfg.data.layout == "synthetic":
        source, names = "synthetic.CLASS_NAMES", list(synthetic.CLASS_NAMES)
    elif storage.exists(source):
        names = [line.strip() for line in storage.read_bytes(source).decode().splitlines() if line.strip()]
    else:
        return table_class_names(cfg) or [f"class_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{source}: {len(names)} class names, but data.n_classes = {n}")
    return names


def load_labeled_images(batch: dict[str, np.ndarray], size: tuple[int, int], label_map: str | None = None,
                        resize: Resizing = ANTIALIAS) -> dict[str, np.ndarray]:
    """Ray Data CPU task: images (load_images) plus their GT labels resized (nearest) to the eval size, the
    protocol resolution of reference sec 7.1; an unreadable image or label becomes all-ignore and `ok` False.
    `label_map` names the label_maps table taking raw label values to class ids (None: read as class ids);
    `resize` gives the image and label methods (data.resize)."""
    batch = load_images(batch, size, resize.images)
    gt = np.full((len(batch["label"]), *size), IGNORE, np.uint8)
    for i, uri in enumerate(batch["label"]):
        try:
            gt[i] = resize_labels(remap_label(label_map, decode_label(storage.read_bytes(uri), uri)), size,
                                  resize.labels).numpy()
        except (BadImageError, storage.StorageError) as e:
            log.warning("skipping image: %s", e)
            batch["ok"][i] = False
    gt[~batch["ok"]] = IGNORE
    return {**batch, "gt": gt}


class Predictor:
    """Ray Data actor: one row per batch with the confusion matrix conf[gt, cluster] (n_classes x n_outputs)
    at the eval size, the unreadable image ids, and the image / GT / cluster arrays of the overlay images."""

    def __init__(self, cfg: Config, decoder: MaskTransformer, overlay_ids: frozenset[str]):
        self.dev = actor_device()
        self.encoder = build_encoder(cfg.encoder).to(self.dev)
        self.decoder = decoder.to(self.dev).eval()
        self.size, self.n_classes, self.overlay_ids = tuple(cfg.eval.image_size), cfg.data.n_classes, overlay_ids
        self.crf = CRFConfig() if cfg.eval.crf else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok, gt = batch["ok"], batch["gt"]
        pred = predict(self.encoder, self.decoder, images_to_device(batch, self.dev), self.size, self.crf)
        shown = ok & np.isin(batch["image_id"], list(self.overlay_ids))
        return {"confusion": confusion_matrix(gt, pred, self.n_classes, self.decoder.n_classes, IGNORE)[None],
                "n_images": np.array([ok.sum()]),
                "bad": np.array(["\n".join(batch["image_id"][~ok])]),
                "overlay_ids": np.array(["\n".join(batch["image_id"][shown])]),
                "overlay_image": batch["image"][shown][None], "overlay_gt": gt[shown][None],
                "overlay_pred": pred[shown][None]}


def bad_ids(row: dict[str, Any]) -> list[str]:
    """The ids of a Predictor row's images skipped because the image or its label could not be read."""
    return [i for i in row["bad"].split("\n") if i]


def val_dataset(cfg: Config, samples: list[Sample]) -> ray.data.Dataset:
    """The val samples with images and GT at the eval size."""
    ds = ray.data.from_items([{"image_id": s.image_id, "uri": s.image, "label": s.label} for s in samples])
    label_map = table_name(cfg.data.layout, cfg.data.n_classes)
    return ds.map_batches(load_labeled_images, fn_kwargs={"size": tuple(cfg.eval.image_size), "label_map": label_map,
                                                             "resize": resizing(cfg.data)},
                          batch_size=cfg.eval.batch_size, num_cpus=1)


def evaluate_result(out: StageOutput, manifest: dict[str, Any], processed: int) -> StageResult:
    """The evaluate stage's result: mIoU, pixel accuracy and per-class IoU (names made MLflow-safe)."""
    m = manifest["metrics"]
    return StageResult("evaluate", out.uri, manifest, processed, metrics={
        "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"],
        **{"iou/" + re.sub(r"[^\w\-. /]", "_", c): v for c, v in m.get("per_class_iou", {}).items()},
        **{f"table3/{k}": v for k, v in m.get("table3", {}).items() if v is not None}})


def run_evaluate(cfg: Config, checkpoint: str | None = None) -> StageResult:
    """Score the decoder at `checkpoint` (default: `eval.checkpoint`, see default_checkpoint) on `data.val_split`.

    Writes `<folder>/{metrics.json, confusion.png, per_class_iou.png, overlays/<id>.png}` (and
    `bad_images.txt` when images or labels could not be read; they are not scored) and commits it with the metrics
    in the manifest (the folder: contract.folder_uri; the result's metrics are mIoU, pixel accuracy and per-class
    IoU); a committed stage returns its stored metrics without recomputing.
    """
    out = contract.output(cfg, "evaluate")
    if out.is_committed():
        return evaluate_result(out, out.manifest(), 0)
    checkpoint = checkpoint or default_checkpoint(cfg)
    decoder, names = load_decoder(checkpoint, cfg), class_names(cfg)
    samples = list_samples(cfg, cfg.data.val_split)
    overlay_ids = frozenset(s.image_id for s in samples[: cfg.eval.n_overlays])
    ds = val_dataset(cfg, samples).map_batches(
        Predictor, fn_constructor_kwargs={"cfg": cfg, "decoder": decoder, "overlay_ids": overlay_ids},
        batch_size=cfg.eval.batch_size, **actor_pool())
    rows = list(track(ds.iter_rows(), "evaluate", len(samples), lambda r: int(r["n_images"]) + len(bad_ids(r))))
    n_images, bad = sum(int(r["n_images"]) for r in rows), sorted(i for r in rows for i in bad_ids(r))
    list_bad_images(out, bad, len(samples))
    if not n_images:
        raise RuntimeError(f"{cfg.data.val_split}: none of the {len(samples)} validation images could be read")
    scores = scores_from_confusion(sum(r["confusion"] for r in rows))  # one matching over the whole split
    s = scores.to_dict()
    metrics = {"miou": s["miou"], "pixel_accuracy": s["pixel_accuracy"],
               "per_class_iou": dict(zip(names, s["per_class_iou"])), "matching": s["matching"],
               "n_images": n_images, "n_bad_images": len(bad), "bad_images": bad, "checkpoint": checkpoint}
    from transfgu_dist.stages.table3 import table3  # imports this module
    metrics["table3"] = table3(cfg, samples, s["miou"])
    out.write_part("metrics.json", json.dumps(metrics, indent=2).encode())
    out.write_part("confusion.png", confusion_matrix_png(scores.confusion, names))
    out.write_part("per_class_iou.png", per_class_iou_png(scores.per_class_iou, names))
    for r in rows:
        for image_id, image, gt, pred in zip(r["overlay_ids"].split("\n"), r["overlay_image"], r["overlay_gt"],
                                             r["overlay_pred"]):
            panel = overlay_panel(image, gt, scores.matching[pred], names, IGNORE)
            out.write_part(f"overlays/{image_id}.png", panel)
    log.info("evaluate: mIoU %.4f, pixel accuracy %.4f over %d images", scores.miou, scores.pixel_accuracy, n_images)
    return evaluate_result(out, out.commit({"metrics": metrics, "settings": settings_guard.record(cfg, "evaluate")}),
                           n_images)
