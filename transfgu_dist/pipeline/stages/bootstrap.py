"""Stage 4, bootstrap: teacher-student training of the Segmenter decoder on Ray Train (sec 3.3, Eqs 9-16).

Round 0 trains the student on the pseudo labels M (Eq. 9). At the start of round r > 0 the teacher becomes
round r-1's student and the student restarts from its initial weights; the labels are M-hat (Eqs 10-12) and
the loss is Eq. 16. A checkpoint is reported after every epoch, so a restarted worker group (FailureConfig)
or a rerun of the job (same RunConfig name and storage) continues from the last finished epoch.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from transfgu_dist.config import Config
from transfgu_dist.inference.segmenter import predict
from transfgu_dist.io import bank, storage
from transfgu_dist.io.concepts_file import load_concepts
from transfgu_dist.io.datasets import has_labels, list_samples
from transfgu_dist.io.image_pool import cluster_gpus, images_to_device, load_images
from transfgu_dist.io.label_maps import IGNORE
from transfgu_dist.io.weights import build_encoder
from transfgu_dist.method.bootstrapping import Bootstrapper, alpha_at, selection_score
from transfgu_dist.method.metrics import confusion_matrix, scores_from_confusion
from transfgu_dist.method.resizing import resizing
from transfgu_dist.pipeline import contract, settings_guard
from transfgu_dist.pipeline.console import epoch_lines
from transfgu_dist.pipeline.contract import StageResult
from transfgu_dist.pipeline.scoring import val_dataset
from transfgu_dist.pipeline.tracking import log_epoch

log = logging.getLogger(__name__)
FAULT_ENV = "TRANSFGU_FAIL_ONCE_AT_EPOCH"  # chaos testing: "<epoch>:<marker file>" makes one worker crash once


def bank_rows(batch: dict[str, np.ndarray], cfg: Config) -> dict[str, np.ndarray]:
    """Ray Data CPU task: bank rows joined with their decoded images, map terms reshaped to (K, h, w) (decoded to
    fp32 maps on the trainer, transfgu_dist.io.bank, so fp16 terms cross the object store). Rows whose image
    can no longer be read (deleted or garbled since pseudo_label) are dropped, not trained on as black images."""
    batch = load_images(batch, cfg.train.image_size, resizing(cfg.data).images)
    ok = batch["ok"]
    if not ok.all():
        log.warning(
            "bootstrap: dropped %d unreadable images of %d in this batch: %s",
            int((~ok).sum()),
            len(ok),
            ", ".join(map(str, batch["image_id"][~ok])),
        )
    return {"image": batch["image"][ok], **{k: v[ok] for k, v in bank.unpack(batch).items()}}


def training_dataset(cfg: Config) -> ray.data.Dataset:
    ds = bank.read(contract.output(cfg, "pseudo_label"))
    if cfg.train.data_fraction < 1:
        ds = ds.random_sample(cfg.train.data_fraction, seed=cfg.train.seed)
    if cfg.train.epoch_repeat > 1:  # reference: VOC and Cityscapes see their training set 20 times per epoch
        ds = ds.union(*[ds] * (cfg.train.epoch_repeat - 1))
    return ds.map_batches(bank_rows, fn_kwargs={"cfg": cfg}, batch_size=cfg.train.batch_size, num_cpus=1)


def _maybe_fail(epoch: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec:
        at, marker = spec.split(":", 1)
        if int(at) == epoch and not Path(marker).exists():
            Path(marker).touch()
            raise RuntimeError(f"injected failure at epoch {epoch} ({FAULT_ENV})")


def _export(cfg: Config, decoder: dict[str, torch.Tensor], round_: int, name: str) -> None:
    """Rank 0: a decoder state as `name`, in the checkpoint format segmenter.load_decoder reads."""
    buf = io.BytesIO()
    torch.save({"decoder": decoder, "n_outputs": cfg.n_outputs, "encoder": asdict(cfg.encoder), "round": round_}, buf)
    contract.output(cfg, "bootstrap").write_part(name, buf.getvalue())


def validates(cfg: Config) -> bool:
    """Validation mIoU during training: every `train.eval_every` epochs where the data has labels. Without labels
    there is no label-free rule for a best epoch: no best.pt is written and final.pt is the model."""
    return cfg.train.eval_every > 0 and has_labels(cfg)


def validate(boot: Bootstrapper, shard: ray.data.DataIterator) -> dict[str, float]:
    """Whole-val-split Hungarian mIoU and pixel accuracy of the current student (sec 4.1)."""
    cfg, size = boot.cfg, tuple(boot.cfg.eval.image_size)
    conf = np.zeros((cfg.data.n_classes, cfg.n_outputs), np.int64)
    boot.student.eval()
    for batch in shard.iter_batches(batch_size=cfg.eval.batch_size, batch_format="numpy"):
        pred = predict(boot.encoder, boot.student, images_to_device(batch, boot.dev), size)
        conf += confusion_matrix(batch["gt"], pred, cfg.data.n_classes, cfg.n_outputs, IGNORE)
    boot.student.train()
    scores = scores_from_confusion(conf)
    return {"val/miou": scores.miou, "val/pixel_accuracy": scores.pixel_accuracy}


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop."""
    cfg: Config = config["cfg"]
    mlflow_run: tuple[str, str] | None = config.get("mlflow_run")  # (tracking URI, run id) for per-epoch metrics
    ctx = ray.train.get_context()
    boot = Bootstrapper(
        cfg,
        build_encoder(cfg.encoder),
        load_concepts(contract.output(cfg, "cluster")).is_fg,
        ray.train.torch.get_device(),
        rank=ctx.get_world_rank(),
        wrap=ray.train.torch.prepare_model,
    )
    rank0 = ctx.get_world_rank() == 0
    round_, epoch = 0, 0
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=boot.dev, weights_only=False)
        boot.load(state)
        round_, epoch = state["round"], state["epoch"] + 1
        best = state["best"]
    else:
        best = {"val/score": -1.0}
    shard = ray.train.get_dataset_shard("train")
    epochs = cfg.train.round_epochs
    global_epoch = sum(epochs[:round_]) + epoch
    resumed_at = global_epoch  # > 0 when this worker group continued from a checkpoint
    while round_ < len(epochs):
        if epoch >= epochs[round_]:  # round finished: publish its student, start the next round
            if rank0:
                _export(cfg, boot.student.state_dict(), round_, f"round-{round_}.pt")
            round_, epoch = round_ + 1, 0
            if round_ < len(epochs):
                boot.start_round()
            continue
        _maybe_fail(global_epoch)
        started = time.perf_counter()
        sums: dict[str, float] = {}
        steps = 0
        for batch in shard.iter_torch_batches(
            batch_size=cfg.train.batch_size,
            device=boot.dev,
            local_shuffle_buffer_size=4 * cfg.train.batch_size,
            local_shuffle_seed=cfg.train.seed + global_epoch,
        ):
            for k, v in boot.step(bank.with_maps(batch), alpha_at(cfg, epoch)).items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        metrics = {f"loss/{k}": v / max(steps, 1) for k, v in sums.items()}
        metrics.update(
            round=round_,
            epoch=epoch,
            global_epoch=global_epoch,
            alpha=alpha_at(cfg, epoch),
            steps=steps,
            resumed_at=resumed_at,
        )
        if rank0 and validates(cfg) and (global_epoch + 1) % cfg.train.eval_every == 0:
            metrics.update(validate(boot, ray.train.get_dataset_shard("val")))
            score = selection_score(metrics, cfg.train.best_by)
            if score > best["val/score"]:  # reference protocol: best epoch on val, kept apart
                best = {
                    "val/score": score,
                    "val/miou": metrics["val/miou"],
                    "global_epoch": global_epoch,
                    "round": round_,
                    "decoder": copy.deepcopy(boot.student.state_dict()),
                }
            metrics.update({f"best/{k}": best[k] for k in ("val/score", "val/miou", "global_epoch") if k in best})
        metrics["epoch_seconds"] = time.perf_counter() - started  # training and validation
        if rank0 and mlflow_run:
            log_epoch(*mlflow_run, metrics, step=global_epoch)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank0:
                torch.save({**boot.state(round_, epoch), "best": best}, Path(d) / "state.pt")
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        epoch += 1
        global_epoch += 1


def make_trainer(
    cfg: Config, run_name: str, callbacks: list | None = None, mlflow_run: tuple[str, str] | None = None
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of all rounds: the bank-joined training set sharded per worker, the val set unsplit."""
    path, fs = storage.ray_storage(storage.join(cfg.output, "ray_train"))
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else cluster_gpus() > 0
    datasets = {"train": training_dataset(cfg)}
    if validates(cfg):
        datasets["val"] = val_dataset(cfg, list_samples(cfg, cfg.data.val_split))
    for ds in datasets.values():  # per-epoch bars from inside the workers only flood the logs; Train reports
        ds.context.enable_progress_bars = False
    return ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "mlflow_run": mlflow_run},
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ordered_ingest()),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.train.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=fs,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )


def ordered_ingest() -> ray.data.ExecutionOptions:
    """Ray Train's default ingest options with the row order kept: without it the batches depend on which Ray
    Data task finishes first, so two runs on the same bank train different decoders."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def run_bootstrap(cfg: Config, mlflow_run: tuple[str, str] | None = None) -> StageResult:
    """Train all rounds on Ray Train (DDP; NCCL on GPU, gloo on CPU); commit the final (and best) decoder. The
    result's `processed` counts the epochs this run trained."""
    out = contract.output(cfg, "bootstrap")
    tags = {"checkpoint": out.part_uri("final.pt")}
    if out.is_committed():
        return StageResult("bootstrap", out.uri, out.manifest(), tags=tags)
    settings_guard.prepare_train_dir(cfg)
    with epoch_lines(sum(cfg.train.round_epochs)) as reporter:  # one console line per epoch on the driver
        result = make_trainer(cfg, "bootstrap", callbacks=[reporter], mlflow_run=mlflow_run).fit()
    last = len(cfg.train.round_epochs) - 1
    out.write_part("final.pt", storage.read_bytes(out.part_uri(f"round-{last}.pt")))
    best = export_best(cfg, result.checkpoint)
    manifest = out.commit(
        {
            "rounds": last + 1,
            "epochs": sum(cfg.train.round_epochs),
            "final": "final.pt",
            "workers": cfg.train.num_workers,
            "metrics": result.metrics,
            **best,
            "train_checkpoint": result.checkpoint.path if result.checkpoint else None,
            "settings": settings_guard.record(cfg, "bootstrap"),
        }
    )
    trained = sum(cfg.train.round_epochs) - result.metrics.get("resumed_at", 0) if result.metrics else 0
    return StageResult("bootstrap", out.uri, manifest, trained, tags=tags)


def export_best(cfg: Config, checkpoint: ray.train.Checkpoint | None) -> dict[str, Any]:
    """best.pt from the last Train checkpoint's best state: written at commit, so it always matches the manifest
    (an epoch-time file could hold a discarded attempt's weights after a restart)."""
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as d:
        best = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)["best"]
    if "decoder" not in best:  # no validation ran (train.eval_every=0, or no labels)
        return {}
    _export(cfg, best["decoder"], best["round"], "best.pt")
    return {"best": "best.pt", "best_epoch": best["global_epoch"], "best_miou": best["val/miou"]}
