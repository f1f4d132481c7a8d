"""Scoring a decoder on labeled images, shared by bootstrap's validation, evaluate and Table 3: the val split with
images and ground truth at the eval size (Ray Data CPU tasks), and the predictor actor that returns confusion
matrices conf[gt, cluster] (Hungarian matching happens once over the whole split, method.metrics)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray

from transfgu_dist.config import Config
from transfgu_dist.inference.segmenter import predict
from transfgu_dist.io import storage
from transfgu_dist.io.datasets import Sample
from transfgu_dist.io.image_pool import actor_device, images_to_device, load_images, to_uint8
from transfgu_dist.io.images import BadImageError, decode_label, resize_labels
from transfgu_dist.io.label_maps import IGNORE, remap_label, table_name
from transfgu_dist.io.storage_errors import StorageError
from transfgu_dist.io.weights import build_encoder
from transfgu_dist.method.crf import CRFConfig
from transfgu_dist.method.decoder import MaskTransformer
from transfgu_dist.method.metrics import confusion_matrix
from transfgu_dist.method.resizing import ANTIALIAS, Resizing, resizing

log = logging.getLogger(__name__)


def load_labeled_images(
    batch: dict[str, np.ndarray], size: tuple[int, int], label_map: str | None = None, resize: Resizing = ANTIALIAS
) -> dict[str, np.ndarray]:
    """Ray Data CPU task: images (load_images) plus their GT labels resized (nearest) to the eval size, the
    resolution the authors' code scores at; an unreadable image or label becomes all-ignore and `ok` False.
    `label_map` names the label_maps table taking raw label values to class ids (None: read as class ids);
    `resize` gives the image and label methods (data.resize)."""
    batch = load_images(batch, size, resize.images)
    gt = np.full((len(batch["label"]), *size), IGNORE, np.uint8)
    for i, uri in enumerate(batch["label"]):
        try:
            gt[i] = resize_labels(
                remap_label(label_map, decode_label(storage.read_bytes(uri), uri)), size, resize.labels
            ).numpy()
        except (BadImageError, StorageError) as e:
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
        self.precision = cfg.eval.precision

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok, gt = batch["ok"], batch["gt"]
        images = images_to_device(batch, self.dev)
        pred = predict(self.encoder, self.decoder, images, self.size, self.crf, self.precision)
        shown = ok & np.isin(batch["image_id"], list(self.overlay_ids))
        return {
            "confusion": confusion_matrix(gt, pred, self.n_classes, self.decoder.n_outputs, IGNORE)[None],
            "n_images": np.array([ok.sum()]),
            "bad": np.array(["\n".join(batch["image_id"][~ok])]),
            "overlay_ids": np.array(["\n".join(batch["image_id"][shown])]),
            "overlay_image": to_uint8(batch["image"][shown])[None],
            "overlay_gt": gt[shown][None],
            "overlay_pred": pred[shown][None],
        }


def bad_ids(row: dict[str, Any]) -> list[str]:
    """The ids of a Predictor row's images skipped because the image or its label could not be read."""
    return [i for i in row["bad"].split("\n") if i]


def val_dataset(cfg: Config, samples: list[Sample]) -> ray.data.Dataset:
    """The val samples with images and GT at the eval size."""
    ds = ray.data.from_items([{"image_id": s.image_id, "uri": s.image, "label": s.label} for s in samples])
    label_map = table_name(cfg.data.layout, cfg.data.n_classes)
    return ds.map_batches(
        load_labeled_images,
        fn_kwargs={"size": tuple(cfg.eval.image_size), "label_map": label_map, "resize": resizing(cfg.data)},
        batch_size=cfg.eval.batch_size,
        num_cpus=1,
    )
