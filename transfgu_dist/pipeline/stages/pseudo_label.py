"""Stage 3, pseudo-label: the bank of Grad-CAM response maps of all K concepts for every training image (Eqs 5-7).

One Parquet row per image: image_id, path (relative to data.root: a moved output or data root keeps working), grid
(h, w), the raw M^k of Eq. 7 as shared, terms and scale (transfgu_dist.io.bank: terms in pseudo.terms_dtype, fp32
labels) and fg_prior (h*w bool: the binarised A_L^cls).
T_bg, normalisation and argmax are applied when loading
(transfgu_dist.method.targets), so they can change without recomputing the bank.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from transfgu_dist.config import Config
from transfgu_dist.io import bank, parts
from transfgu_dist.io.concepts_file import load_concepts
from transfgu_dist.io.datasets import list_samples, relative_path
from transfgu_dist.io.image_pool import actor_device, images_to_device
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.io.weights import build_encoder
from transfgu_dist.method.crops import foreground_prior
from transfgu_dist.method.encoder import normalize
from transfgu_dist.method.gradcam import gradcam_terms
from transfgu_dist.method.precision import autocast
from transfgu_dist.method.resizing import resizing
from transfgu_dist.pipeline import contract, settings_guard
from transfgu_dist.pipeline.contract import StageResult
from transfgu_dist.pipeline.image_stage import ImagesDone, run_image_stage


class ConceptMapper:
    """Ray Data actor: a batch of images -> one bank part (one batched backward for all K concepts)."""

    def __init__(self, cfg: Config, out_uri: str, progress: Any = None):
        self.cfg, self.dev, self.out = cfg, actor_device(), StageOutput(out_uri)
        self.progress = ImagesDone(progress)
        self.encoder = build_encoder(cfg.encoder).to(self.dev)
        self.concepts = torch.from_numpy(load_concepts(contract.output(cfg, "cluster")).centroids).to(self.dev)
        self.settings = settings_guard.part_metadata(cfg, "pseudo_label")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"]
        ids = [str(i) for i in batch["image_id"][ok]]
        images = normalize(images_to_device({"image": batch["image"][ok]}, self.dev))
        if ids:
            cams = []
            for x in images.split(self.cfg.pseudo.batch_size):  # Grad-CAM batches; one part for the whole call
                with autocast(self.dev, self.cfg.pseudo.precision):
                    cams.append(gradcam_terms(self.encoder, x, self.concepts, self.cfg.pseudo))
                self.progress.upto(self.progress.n + len(x))
            shared, terms, attn = (torch.cat(t) for t in zip(*cams))
        else:  # every image of the batch unreadable: an empty part records them
            h, w = (s // self.encoder.patch_size for s in self.cfg.pseudo.image_size)
            shared, terms, attn = torch.zeros(0, h, w), torch.zeros(0, len(self.concepts), h, w), torch.zeros(0, h, w)
        h, w = attn.shape[-2:]
        table = pa.table(
            {
                "image_id": pa.array(ids, pa.string()),
                "path": pa.array([relative_path(self.cfg, str(u)) for u in batch["uri"][ok]], pa.string()),
                "grid": parts.fixed_list(np.tile(np.array([h, w], np.int32), (len(ids), 1)), pa.int32()),
                **bank.columns(shared, terms, self.cfg.pseudo.terms_dtype),
                "fg_prior": parts.fixed_list(foreground_prior(attn.float()).flatten(1).cpu().numpy(), pa.bool_()),
            },
            metadata=self.settings,
        )
        bad = [str(i) for i in batch["image_id"][~ok]]
        name = parts.write_part(self.out, table, ids, bad, dict(zip(bad, batch["error"][~ok])))
        self.progress.finish(len(batch["image_id"]))
        return {"part": np.array([name]), "images": np.array([len(batch["image_id"])])}


def run_pseudo_label(cfg: Config) -> StageResult:
    """The bank of every training image; images extract covered that are gone since are listed as bad. The
    concepts are read here first, so a damaged concepts file fails in one line before any actor starts."""
    out = contract.output(cfg, "pseudo_label")
    load_concepts(contract.output(cfg, "cluster"))
    samples = list_samples(cfg, cfg.data.train_split)
    listed = {s.image_id for s in samples}
    extracted = set().union(*parts.processed_ids(contract.output(cfg, "extract")))
    gone = dict.fromkeys(sorted(extracted - listed), "image file gone since extract (deleted or moved)")
    return run_image_stage(
        "pseudo_label",
        out,
        samples,
        cfg.pseudo.image_size,
        ConceptMapper,
        {"cfg": cfg, "out_uri": out.uri},
        cfg.pseudo.batch_size,
        cfg.pseudo.images_per_part,
        {
            "concepts": cfg.n_concepts,
            "similarity": cfg.pseudo.similarity,
            "response": cfg.pseudo.response,
            "resize": cfg.data.resize,
            "settings": settings_guard.record(cfg, "pseudo_label"),
        },
        cfg.resources,
        resizing(cfg.data).full,
        gone,
    )
