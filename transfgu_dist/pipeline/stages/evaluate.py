"""Evaluation stage: mIoU and pixel accuracy of the bootstrapped decoder on the whole validation split.

Paper sec 4.1: predicted cluster ids are aligned to the ground truth by Hungarian matching over all validation
images. As the authors' code does, images and labels (nearest) are resized to the protocol size and scored there; the
logits are upsampled bilinearly (align_corners=False) and argmaxed; ONE confusion matrix is accumulated over the
split and matched once.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from transfgu_dist.config import Config
from transfgu_dist.inference.segmenter import load_decoder
from transfgu_dist.inference.viz import confusion_matrix_png, overlay_panel, per_class_iou_png
from transfgu_dist.io import storage, synthetic
from transfgu_dist.io.datasets import has_labels, list_samples
from transfgu_dist.io.image_pool import actor_pool
from transfgu_dist.io.label_maps import IGNORE
from transfgu_dist.io.label_maps import class_names as table_class_names
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.method.metrics import scores_from_confusion
from transfgu_dist.pipeline import contract, settings_guard
from transfgu_dist.pipeline.console import track
from transfgu_dist.pipeline.contract import StageResult
from transfgu_dist.pipeline.image_stage import list_bad_images
from transfgu_dist.pipeline.recovery import node_losses
from transfgu_dist.pipeline.results_table import markdown, results_table, table_metrics
from transfgu_dist.pipeline.scoring import Predictor, bad_ids, val_dataset

log = logging.getLogger(__name__)
RESULTS_MD = "results_table.md"  # the results table in Markdown, beside metrics.json


def default_checkpoint(cfg: Config) -> str:
    """`eval.checkpoint`: "" -> bootstrap/final.pt, "best" -> bootstrap/best.pt, else the URI itself."""
    name = {"": "final.pt", "best": "best.pt"}.get(cfg.eval.checkpoint)
    return storage.join(cfg.output, "bootstrap", name) if name else cfg.eval.checkpoint


def relative_checkpoint(cfg: Config, uri: str) -> str:
    """The scored checkpoint as the manifest records it: relative to the output when inside it (a moved or copied
    output scores and logs its own model), else the URI."""
    root = cfg.output.rstrip("/") + "/"
    return uri[len(root) :] if uri.startswith(root) else uri


def scored_checkpoint(cfg: Config, recorded: str) -> str:
    """The URI of a checkpoint recorded by `relative_checkpoint`."""
    return recorded if "://" in recorded or recorded.startswith("/") else storage.join(cfg.output, recorded)


def class_names(cfg: Config) -> list[str]:
    """Ground-truth class names: the synthetic ones, `<data root>/classes.txt` (one a line), the label table's
    (label_maps), else `class_<i>`."""
    n = cfg.data.n_classes
    source = storage.join(cfg.data_root, "classes.txt")
    if cfg.data.layout == "synthetic":
        source, names = "synthetic.CLASS_NAMES", list(synthetic.CLASS_NAMES)
    elif storage.exists(source):
        names = [line.strip() for line in storage.read_bytes(source).decode().splitlines() if line.strip()]
    else:
        return table_class_names(cfg) or [f"class_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{source}: {len(names)} class names, but data.n_classes = {n}")
    return names


def table_models(cfg: Config, out: StageOutput) -> tuple[dict[str, Any], dict[str, str], dict[str, float]]:
    """The results table's models: the run's bootstrap/final.pt and best.pt where they exist, and the linear probe
    trained here with probe.enabled; with the checkpoint each row names and the probe's last training figures."""
    models, names, probe = {}, {}, {}
    for model in ("final", "best"):
        uri = storage.join(cfg.output, "bootstrap", f"{model}.pt")
        if storage.exists(uri):
            models[model], names[model] = load_decoder(uri, cfg), relative_checkpoint(cfg, uri)
    if cfg.probe.enabled:
        from transfgu_dist.pipeline.linear_probe import PROBE_FILE, train_probe

        models["linear"], probe = train_probe(cfg, out)
        names["linear"] = relative_checkpoint(cfg, out.part_uri(PROBE_FILE))
    return models, names, probe


def evaluate_result(out: StageOutput, manifest: dict[str, Any], processed: int) -> StageResult:
    """The evaluate stage's result: mIoU, pixel accuracy and per-class IoU (names made MLflow-safe). A class absent
    from the ground truth and the prediction has no IoU (null in metrics.json) and no metric: nothing is NaN."""
    m = manifest["metrics"]
    if not m.get("scored", True):  # no labels: cluster pixel shares instead
        shares = {f"pixel_share/cluster_{c['cluster']}": c["pixel_share"] for c in m["clusters"]}
        return StageResult("evaluate", out.uri, manifest, processed, metrics=shares, tags={"scored": "no labels"})
    metrics = {
        "miou": m["miou"],
        "pixel_accuracy": m["pixel_accuracy"],
        **{"iou/" + re.sub(r"[^\w\-. /]", "_", c): v for c, v in m.get("per_class_iou", {}).items()},
        **{f"table3/{k}": v for k, v in m.get("table3", {}).items()},
        **table_metrics(m.get("results_table", [])),
    }
    numbers = {k: v for k, v in metrics.items() if v is not None and v == v}  # v != v: NaN
    return StageResult("evaluate", out.uri, manifest, processed, metrics=numbers)


def run_evaluate(cfg: Config, checkpoint: str | None = None) -> StageResult:
    """Score the decoder at `checkpoint` (default: `eval.checkpoint`, see default_checkpoint) on `data.val_split`;
    without labels (`data.layout=folder`) describe its clusters on the images instead (cluster_summary).

    Writes `<folder>/{metrics.json, confusion.png, per_class_iou.png, overlays/<id>.png}` (and `bad_images.txt`
    when images or labels could not be read; they are not scored); the run's own evaluate (eval.checkpoint "" and
    eval.crf false) also `results_table.md` (and `linear_probe.pt` with probe.enabled). It commits the folder with
    the metrics in the manifest (the folder: contract.folder_uri; the result's metrics are mIoU, pixel accuracy,
    per-class IoU and the results table's figures, results_table); a committed stage returns its stored metrics
    without recomputing.
    """
    out = contract.output(cfg, "evaluate")
    if out.is_committed():
        return evaluate_result(out, out.manifest(), 0)
    checkpoint = checkpoint or default_checkpoint(cfg)
    if not has_labels(cfg):
        from transfgu_dist.pipeline.cluster_summary import summarise_clusters

        decoder, samples = load_decoder(checkpoint, cfg), list_samples(cfg, cfg.data.train_split)
        metrics = summarise_clusters(cfg, out, checkpoint, decoder, samples)
        manifest = out.commit({"metrics": metrics, "settings": settings_guard.record(cfg, "evaluate")})
        return evaluate_result(out, manifest, metrics["n_images"])
    decoder, names = load_decoder(checkpoint, cfg), class_names(cfg)
    samples = list_samples(cfg, cfg.data.val_split)
    overlay_ids = frozenset(s.image_id for s in samples[: cfg.eval.n_overlays])
    ds = val_dataset(cfg, samples).map_batches(
        Predictor,
        fn_constructor_kwargs={"cfg": cfg, "decoder": decoder, "overlay_ids": overlay_ids},
        batch_size=cfg.eval.batch_size,
        **actor_pool(cfg.resources),
    )
    with node_losses("evaluate"):
        rows = list(track(ds.iter_rows(), "evaluate", len(samples), lambda r: int(r["n_images"]) + len(bad_ids(r))))
    n_images, bad = sum(int(r["n_images"]) for r in rows), sorted(i for r in rows for i in bad_ids(r))
    uris = {s.image_id: s.image for s in samples}
    list_bad_images(out, {uris[i]: "image or label unreadable" for i in bad}, len(samples))
    if not n_images:
        raise RuntimeError(f"{cfg.data.val_split}: none of the {len(samples)} validation images could be read")
    scores = scores_from_confusion(sum(r["confusion"] for r in rows))  # one matching over the whole split
    s = scores.to_dict()
    present = sum(v is not None for v in s["per_class_iou"])
    metrics = {
        "miou": s["miou"],
        "pixel_accuracy": s["pixel_accuracy"],
        "per_class_iou": dict(zip(names, s["per_class_iou"])),
        "miou_over": f"the {present} of {len(names)} classes present in the ground truth or the matched prediction "
        "(as the reference metric); the others have no IoU (null)",
        "matching": s["matching"],
        "n_images": n_images,
        "n_bad_images": len(bad),
        "bad_images": bad,
        "checkpoint": relative_checkpoint(cfg, checkpoint),
    }
    from transfgu_dist.pipeline.table3 import table3  # imports this module

    metrics["table3"] = table3(cfg, samples, s["miou"])
    if not cfg.eval.checkpoint and not cfg.eval.crf:  # the run's own evaluate: the table of all its checkpoints
        models, checkpoints, probe = table_models(cfg, out)
        metrics["results_table"] = results_table(cfg, samples, models, checkpoints)
        metrics.update({"linear_probe_training": probe} if probe else {})
        title = f"{cfg.output} ({n_images} val images)"
        out.write_part(RESULTS_MD, markdown(metrics["results_table"], title).encode())
    out.write_part("metrics.json", json.dumps(metrics, indent=2).encode())
    out.write_part("confusion.png", confusion_matrix_png(scores.confusion, names))
    out.write_part("per_class_iou.png", per_class_iou_png(scores.per_class_iou, names))
    for r in rows:
        for image_id, image, gt, pred in zip(
            r["overlay_ids"].split("\n"), r["overlay_image"], r["overlay_gt"], r["overlay_pred"]
        ):
            panel = overlay_panel(image, gt, scores.matching[pred], names, IGNORE)
            out.write_part(f"overlays/{image_id}.png", panel)
    log.info("evaluate: mIoU %.4f, pixel accuracy %.4f over %d images", scores.miou, scores.pixel_accuracy, n_images)
    return evaluate_result(
        out, out.commit({"metrics": metrics, "settings": settings_guard.record(cfg, "evaluate")}), n_images
    )
