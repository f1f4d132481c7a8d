"""Stage 4, bootstrap: teacher-student training of the Segmenter decoder on Ray Train (sec 3.3, Eqs 9-16).

Round 0 trains the student on the pseudo labels M (Eq. 9). At the start of round r > 0 the teacher becomes
round r-1's student and the student restarts from its initial weights; the labels are M-hat (Eqs 10-12) and
the loss is Eq. 16. A checkpoint is reported after every epoch, so a restarted worker group (FailureConfig)
or a rerun of the job (same RunConfig name and storage) continues from the last finished epoch. The images are
decoded once, before the first epoch (pipeline.training_data); each epoch's time split is reported
(pipeline.epoch_timing).
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

from transfgu_dist.config import Config, worker_range
from transfgu_dist.inference.segmenter import predict
from transfgu_dist.io import bank, storage
from transfgu_dist.io.concepts_file import load_concepts
from transfgu_dist.io.datasets import has_labels, image_uri, list_samples
from transfgu_dist.io.image_pool import cluster_gpus, images_to_device
from transfgu_dist.io.label_maps import IGNORE
from transfgu_dist.io.storage_errors import StorageError
from transfgu_dist.io.weights import build_encoder
from transfgu_dist.method.bootstrapping import INITIAL_BEST_SCORE, Bootstrapper, alpha_at, selection_score
from transfgu_dist.method.metrics import confusion_matrix, scores_from_confusion
from transfgu_dist.pipeline import contract, settings_guard
from transfgu_dist.pipeline.console import epoch_lines
from transfgu_dist.pipeline.contract import StageResult
from transfgu_dist.pipeline.epoch_timing import EpochClock
from transfgu_dist.pipeline.ray_setup import fit
from transfgu_dist.pipeline.scoring import val_dataset
from transfgu_dist.pipeline.tracking import log_epoch
from transfgu_dist.pipeline.training_data import (
    EpochFeed,
    build_cache,
    cache_output,
    ordered_ingest,
    training_dataset,
)

log = logging.getLogger(__name__)
FAULT_ENV = "TRANSFGU_FAIL_ONCE_AT_EPOCH"  # chaos testing: "<epoch>:<marker file>" makes one worker crash once


MIN_IMAGES = 0.9  # bootstrap refuses to train on fewer than this fraction of its bank's images


def check_images(cfg: Config) -> None:
    """Before training: one line naming the count and the likely cause when fewer than MIN_IMAGES of the bank's
    images are under data.root (a moved data root, an output copied without its data); a warning for any missing
    (their rows are dropped from training)."""
    out = contract.output(cfg, "pseudo_label")
    wanted = [image_uri(cfg, p) for p in bank.paths(out)]
    there = set(storage.list_files(cfg.data_root))
    missing = [u for u in wanted if u not in there]
    if len(wanted) - len(missing) < max(1, MIN_IMAGES * len(wanted)):
        raise StorageError(
            cfg.data_root,
            f"{len(missing)} of the {len(wanted)} images of the bank {out.uri} are not there (e.g. {missing[0]}); "
            f"bootstrap trains on at least {MIN_IMAGES:.0%} of them: was data.root moved or the output copied "
            f"without its data? Give data.root=<where the images are>",
        )
    if missing:
        log.warning(
            "bootstrap: %d of the %d bank images are gone (not trained on), e.g. %s",
            len(missing),
            len(wanted),
            missing[0],
        )


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
        pred = predict(boot.encoder, boot.student, images_to_device(batch, boot.dev), size, None, cfg.eval.precision)
        conf += confusion_matrix(batch["gt"], pred, cfg.data.n_classes, cfg.n_outputs, IGNORE)
    boot.student.train()
    scores = scores_from_confusion(conf)
    return {"val/miou": scores.miou, "val/pixel_accuracy": scores.pixel_accuracy}


def load_state(folder: Path, uri: str, dev: torch.device | str, name: str = "state.pt") -> dict[str, Any]:
    """A Ray Train checkpoint file (`uri`: the checkpoint's storage path); an unreadable one fails in one line
    naming it."""
    try:
        return torch.load(folder / name, map_location=dev, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch.load raises anything an unpickler can (UnpicklingError, EOFError, ...)
        raise StorageError(
            storage.join(uri, name),
            f"not a readable Ray Train checkpoint file ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"delete {uri.rsplit('/', 1)[0]} to restart training",
        ) from None


def cpu_threads(local_workers: int) -> int:
    """A CPU worker's torch threads: its equal share of the node's cores. Ray sets OMP_NUM_THREADS to the worker's
    CPUs (train.cpus_per_worker), which leaves the rest of a CPU node idle: the per-epoch ingest reads the
    decoded-once images (pipeline.training_data) and needs little of it."""
    return max(1, (os.cpu_count() or 1) // max(1, local_workers))


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop."""
    cfg: Config = config["cfg"]
    mlflow_run: tuple[str, str] | None = config.get("mlflow_run")  # (tracking URI, run id) for per-epoch metrics
    ctx = ray.train.get_context()
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads(ctx.get_local_world_size()))
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
            state = load_state(Path(d), ckpt.path, boot.dev)
            if (Path(d) / f"rng-{ctx.get_world_rank()}.pt").exists():  # this rank's own streams
                state["rng"] = load_state(Path(d), ckpt.path, boot.dev, f"rng-{ctx.get_world_rank()}.pt")
        boot.load(state)
        round_, epoch = state["round"], state["epoch"] + 1
        best, group_sizes, epoch_times = state["best"], state.get("group_sizes", []), state.get("epoch_times", [])
    else:
        best, group_sizes, epoch_times = {"val/score": INITIAL_BEST_SCORE}, [], []
    epochs = cfg.train.round_epochs
    global_epoch = sum(epochs[:round_]) + epoch
    resumed_at = global_epoch  # > 0 when this worker group continued from a checkpoint
    started_at = time.time()  # wall clock of this worker group's start (recovery time, benchmarks.elastic)
    clock, feed = EpochClock(), EpochFeed(cfg, boot.dev, sum(epochs))
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
        for batch in clock.batches(feed.batches(global_epoch)):
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
            group_started_at=started_at,
            world_size=ctx.get_world_size(),
        )
        if rank0 and validates(cfg) and (global_epoch + 1) % cfg.train.eval_every == 0:
            with clock.phase("validate"):
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
            with clock.phase("log"):
                log_epoch(*mlflow_run, metrics, step=global_epoch)
        group_sizes = [*group_sizes[:global_epoch], ctx.get_world_size()]  # worker-group size of each epoch
        epoch_times = [*epoch_times[:global_epoch], clock.record(ctx.get_world_size())]
        clock = EpochClock()
        with clock.phase("checkpoint"), tempfile.TemporaryDirectory() as d:  # counted in the next epoch's split
            torch.save(boot.rng_state(), Path(d) / f"rng-{ctx.get_world_rank()}.pt")
            if rank0:
                state = {**boot.state(round_, epoch), "best": best, "group_sizes": group_sizes}
                torch.save({**state, "epoch_times": epoch_times}, Path(d) / "state.pt")
            checkpoint = ray.train.Checkpoint.from_directory(d)  # Ray Train merges every rank's files into one
            report = {**metrics, "group_sizes": group_sizes, "epoch_times": epoch_times}
            ray.train.report(report, checkpoint=checkpoint)
        epoch += 1
        global_epoch += 1


def make_trainer(
    cfg: Config, run_name: str, callbacks: list | None = None, mlflow_run: tuple[str, str] | None = None
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of all rounds: the val set unsplit, and under train.shuffle=local the bank-joined training set
    sharded per worker (global: epoch_shard builds each epoch's; the bank is checked here either way)."""
    path, fs = storage.ray_storage(storage.join(cfg.output, "ray_train"))
    train_set = training_dataset(cfg)
    datasets = {"train": train_set} if cfg.train.shuffle == "local" else {}
    split = list(datasets)
    if validates(cfg):
        datasets["val"] = val_dataset(cfg, list_samples(cfg, cfg.data.val_split))
    for ds in datasets.values():  # per-epoch bars from inside the workers only flood the logs; Train reports
        ds.context.enable_progress_bars = False
    return ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "mlflow_run": mlflow_run},
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=split, execution_options=ordered_ingest()),
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=fs,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )


def scaling_config(cfg: Config) -> ray.train.ScalingConfig:
    """train.num_workers workers, or an elastic group of [min, max] (Ray Train resizes it as nodes come and go),
    each with train.cpus_per_worker CPUs and, with train.use_gpu (None: if the cluster has GPUs now), one GPU."""
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else cluster_gpus() > 0
    low, high = worker_range(cfg.train.num_workers)
    return ray.train.ScalingConfig(
        num_workers=low if low == high else (low, high),
        use_gpu=use_gpu,
        resources_per_worker={"CPU": cfg.train.cpus_per_worker},
    )


def run_bootstrap(cfg: Config, mlflow_run: tuple[str, str] | None = None) -> StageResult:
    """Train all rounds on Ray Train (DDP; NCCL on GPU, gloo on CPU); commit the final (and best) decoder. The
    result's `processed` counts the epochs this run trained."""
    out = contract.output(cfg, "bootstrap")
    tags = {"checkpoint": out.part_uri("final.pt")}
    if out.is_committed():
        return StageResult("bootstrap", out.uri, out.manifest(), tags=tags)
    if not cache_output(cfg).is_committed():
        check_images(cfg)
    build_cache(cfg)
    settings_guard.prepare_train_dir(cfg)
    with epoch_lines(sum(cfg.train.round_epochs)) as reporter:  # one console line per epoch on the driver
        result = fit(make_trainer(cfg, "bootstrap", callbacks=[reporter], mlflow_run=mlflow_run))
    if result.metrics and result.metrics.get("steps") == 0:
        raise storage.StorageError(
            cfg.data_root,
            f"none of the bank's images could be read there: bootstrap's last epoch ran 0 optimizer steps; "
            f"{out.uri} not committed",
        )
    last = len(cfg.train.round_epochs) - 1
    out.write_part("final.pt", storage.read_bytes(out.part_uri(f"round-{last}.pt")))
    best = export_best(cfg, result.checkpoint)
    manifest = out.commit(
        {
            "rounds": last + 1,
            "epochs": sum(cfg.train.round_epochs),
            "final": "final.pt",
            "workers": cfg.train.num_workers,  # configured: an int, or (min, max) for an elastic group
            "group_sizes": result.metrics.get("group_sizes", []) if result.metrics else [],
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
        best = load_state(Path(d), checkpoint.path, "cpu")["best"]
    if "decoder" not in best:  # no validation ran (train.eval_every=0, or no labels)
        return {}
    _export(cfg, best["decoder"], best["round"], "best.pt")
    return {"best": "best.pt", "best_epoch": best["global_epoch"], "best_miou": best["val/miou"]}
