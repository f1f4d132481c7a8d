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
from torch import nn

from transfgu_dist import bank, contract, parts, settings_guard, storage
from transfgu_dist.augment import AugmentConfig, crop_and_flip, photometric, random_crop_boxes
from transfgu_dist.config import Config
from transfgu_dist.console import epoch_lines
from transfgu_dist.contract import StageResult
from transfgu_dist.decoder import MaskTransformer
from transfgu_dist.encoder import build_encoder
from transfgu_dist.images import normalize
from transfgu_dist.losses import cross_entropy, diversity_loss, peer_loss, total_loss, uncertainty_loss
from transfgu_dist.stages.cluster import load_concepts
from transfgu_dist.datasets import list_samples
from transfgu_dist.metrics import confusion_matrix, scores_from_confusion
from transfgu_dist.stages.common import cluster_gpus, images_to_device, load_images
from transfgu_dist.resizing import resizing
from transfgu_dist.segmenter import predict
from transfgu_dist.stages.evaluate import IGNORE, val_dataset
from transfgu_dist.tracking import log_epoch
from transfgu_dist.stages.pseudo_label import bank_output
from transfgu_dist.storage import StageOutput
from transfgu_dist.targets import bootstrapped, hard_labels, soft_targets

log = logging.getLogger(__name__)
FAULT_ENV = "TRANSFGU_FAIL_ONCE_AT_EPOCH"  # chaos testing: "<epoch>:<marker file>" makes one worker crash once


def bootstrap_output(cfg: Config) -> StageOutput:
    return contract.output(cfg, "bootstrap")


def bank_rows(batch: dict[str, np.ndarray], cfg: Config) -> dict[str, np.ndarray]:
    """Ray Data CPU task: bank rows joined with their decoded images, map terms reshaped to (K, h, w) (decoded to
    fp32 maps on the trainer, transfgu_dist.bank, so fp16 terms cross the object store). Rows whose image
    can no longer be read (deleted or garbled since pseudo_label) are dropped, not trained on as black images."""
    batch = load_images(batch, cfg.train.image_size, resizing(cfg.data).images)
    ok = batch["ok"]
    if not ok.all():
        log.warning("bootstrap: dropped %d unreadable images of %d in this batch: %s", int((~ok).sum()), len(ok),
                    ", ".join(map(str, batch["image_id"][~ok])))
    n, (h, w) = len(ok), batch["grid"][0]
    return {"image": batch["image"][ok], "shared": np.stack(batch["shared"]).reshape(n, h, w)[ok],
            "terms": np.stack(batch["terms"]).reshape(n, -1, h, w)[ok], "scale": batch["scale"][ok],
            "fg_prior": np.stack(batch["fg_prior"]).reshape(n, h, w)[ok]}


def training_dataset(cfg: Config) -> ray.data.Dataset:
    uris = parts.part_uris(bank_output(cfg))
    bank.check_part(uris[0])
    fs, _ = storage.filesystem(uris[0])
    # the committed part list is known: Ray 2.60's default (V2) reader would list it again with a pool of 32
    # footer-reading actors per read, seconds of process start-up per epoch on a small node
    ray.data.DataContext.get_current().use_datasource_v2 = False
    ds = ray.data.read_parquet([storage.filesystem(u)[1] for u in uris], filesystem=fs)
    if cfg.train.data_fraction < 1:
        ds = ds.random_sample(cfg.train.data_fraction, seed=cfg.train.seed)
    if cfg.train.epoch_repeat > 1:  # reference: VOC and Cityscapes see their training set 20 times per epoch
        ds = ds.union(*[ds] * (cfg.train.epoch_repeat - 1))
    return ds.map_batches(bank_rows, fn_kwargs={"cfg": cfg}, batch_size=cfg.train.batch_size, num_cpus=1)


def alpha_at(cfg: Config, epoch_in_round: int) -> float:
    """Eq. 13's alpha; the reference grows it per epoch since the last teacher update, capped."""
    return min(cfg.loss.alpha + cfg.loss.alpha_step * epoch_in_round, cfg.loss.alpha_max)


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam with L2 weight decay on matrices only (biases and norms undecayed), as the reference."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.Adam([{"params": decay, "weight_decay": cfg.train.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.train.lr)


class Bootstrapper:
    """One worker's state: frozen encoder, student, teacher, optimizer, and the step of Eqs 9-16."""

    def __init__(self, cfg: Config, dev: torch.device):
        self.cfg, self.dev = cfg, dev
        self.encoder = build_encoder(cfg.encoder).to(dev)
        torch.manual_seed(cfg.train.seed)
        self.student = MaskTransformer(self.encoder.dim, cfg.n_outputs, cfg.decoder).to(dev)
        self.initial = copy.deepcopy(self.student.state_dict())
        self.teacher: MaskTransformer | None = None
        self.optimizer = make_optimizer(self.student, cfg)
        self.aug = AugmentConfig(per_batch=cfg.train.per_batch_augment, crop_resize=resizing(cfg.data).crops)
        self.gen = torch.Generator(device=dev).manual_seed(cfg.train.seed + ray.train.get_context().get_world_rank())
        is_fg = torch.from_numpy(load_concepts(cfg).is_fg).to(dev)
        self.is_fg = is_fg if cfg.pseudo.split_fg_bg and 0 < int(is_fg.sum()) < len(is_fg) else None
        self.model = ray.train.torch.prepare_model(self.student)

    def start_round(self) -> None:
        """Sec 3.3: teacher <- current student; student <- its initial state."""
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.student.load_state_dict(self.initial)
        if self.cfg.train.reset_optimizer:
            self.optimizer = make_optimizer(self.student, self.cfg)

    def state(self, round_: int, epoch: int) -> dict[str, Any]:
        """Everything the next epoch depends on, random number streams included (the global one drives dropout,
        `gen` the augmentations), so a resumed run continues the uninterrupted one bit for bit."""
        return {"student": self.student.state_dict(), "initial": self.initial, "optimizer": self.optimizer.state_dict(),
                "teacher": self.teacher.state_dict() if self.teacher else None, "round": round_, "epoch": epoch,
                "rng": {"torch": torch.get_rng_state(), "gen": self.gen.get_state(),
                        "cuda": torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None}}

    def load(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.initial = state["initial"]
        self.optimizer.load_state_dict(state["optimizer"])
        if state["teacher"] is not None:
            self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
            self.teacher.load_state_dict(state["teacher"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        self.gen.set_state(rng["gen"].cpu())
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.dev)

    def targets(self, maps: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Soft labels M of the crop (Eq. 8 where configured) and the pseudo-foreground pixels."""
        loss = self.cfg.loss
        scores = soft_targets(maps, norm=loss.label_norm, t_bg=loss.t_bg if loss.background_channel else None,
                              fg_prior=fg if self.is_fg is not None else None, is_fg=self.is_fg)
        valid = scores[:, 1:].amax(1) > loss.t_bg if loss.background_channel else None
        return scores, valid

    def step(self, batch: dict[str, torch.Tensor], alpha: float) -> dict[str, float]:
        cfg = self.cfg
        images = photometric(batch["image"].permute(0, 3, 1, 2).float().div(255), self.aug, self.gen)
        maps, fg = bank.decode(batch["shared"], batch["terms"], batch["scale"]), batch["fg_prior"].float()
        B, K, h, w = maps.shape
        H, W = images.shape[-2:]
        boxes = random_crop_boxes(B, H, W, self.aug, self.gen)
        images, labels = crop_and_flip(images, torch.cat([maps, fg[:, None]], 1), boxes, (H // 2, W // 2),
                                       (H // 2 // self.encoder.patch_size, W // 2 // self.encoder.patch_size),
                                       self.aug, self.gen)
        scores, valid = self.targets(labels[:, :K], labels[:, K] > 0.5)
        with torch.no_grad():
            patch = self.encoder(normalize(images)).patch
        out = self.model(patch)
        if self.teacher is None:
            peer = cross_entropy(out.logits, hard_labels(scores))                         # Eq. 9
        else:
            with torch.no_grad():
                scores = bootstrapped(scores, self.teacher(patch).logits)                 # Eqs 10, 12
            perm = torch.randperm(scores.shape[1], generator=self.gen, device=self.gen.device).to(self.dev)
            peer = peer_loss(out.logits, hard_labels(scores), alpha, perm)               # Eqs 11, 13
        terms = total_loss(peer, diversity_loss(out.class_emb, cfg.loss.diversity),
                           uncertainty_loss(out.logits, valid, skip_channel0=cfg.loss.background_channel),
                           cfg.loss.omega1, cfg.loss.omega2)                              # Eqs 14-16
        optimizer_step(self.optimizer, self.student, terms.total, cfg)
        return terms.as_floats()


def optimizer_step(optimizer: torch.optim.Optimizer, model: nn.Module, loss: torch.Tensor, cfg: Config) -> bool:
    """Backward, gradient value clamp and step; with train.skip_nonpositive_loss (reference) none when loss <= 0."""
    optimizer.zero_grad(set_to_none=True)
    if cfg.train.skip_nonpositive_loss and loss.item() <= 0:
        return False
    loss.backward()
    nn.utils.clip_grad_value_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    return True


def selection_score(metrics: dict[str, float], best_by: str) -> float:
    """Score the best checkpoint maximises: val mIoU, or (reference) mIoU + pixel accuracy."""
    return metrics["val/miou"] + (metrics["val/pixel_accuracy"] if best_by == "miou_plus_acc" else 0.0)


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
    bootstrap_output(cfg).write_part(name, buf.getvalue())


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
    boot = Bootstrapper(cfg, ray.train.torch.get_device())
    ctx = ray.train.get_context()
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
        for batch in shard.iter_torch_batches(batch_size=cfg.train.batch_size, device=boot.dev,
                                              local_shuffle_buffer_size=4 * cfg.train.batch_size,
                                              local_shuffle_seed=cfg.train.seed + global_epoch):
            for k, v in boot.step(batch, alpha_at(cfg, epoch)).items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        metrics = {f"loss/{k}": v / max(steps, 1) for k, v in sums.items()}
        metrics.update(round=round_, epoch=epoch, global_epoch=global_epoch, alpha=alpha_at(cfg, epoch), steps=steps,
                       resumed_at=resumed_at)
        if rank0 and cfg.train.eval_every and (global_epoch + 1) % cfg.train.eval_every == 0:
            metrics.update(validate(boot, ray.train.get_dataset_shard("val")))
            score = selection_score(metrics, cfg.train.best_by)
            if score > best["val/score"]:  # reference protocol: best epoch on val, kept apart
                best = {"val/score": score, "val/miou": metrics["val/miou"], "global_epoch": global_epoch,
                        "round": round_, "decoder": copy.deepcopy(boot.student.state_dict())}
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


def make_trainer(cfg: Config, run_name: str, callbacks: list | None = None,
                 mlflow_run: tuple[str, str] | None = None) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of all rounds: the bank-joined training set sharded per worker, the val set unsplit."""
    path, fs = storage.ray_storage(storage.join(cfg.output, "ray_train"))
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else cluster_gpus() > 0
    datasets = {"train": training_dataset(cfg)}
    if cfg.train.eval_every:
        datasets["val"] = val_dataset(cfg, list_samples(cfg, cfg.data.val_split))
    for ds in datasets.values():  # per-epoch bars from inside the workers only flood the logs; Train reports
        ds.context.enable_progress_bars = False
    return ray.train.torch.TorchTrainer(
        train_loop, train_loop_config={"cfg": cfg, "mlflow_run": mlflow_run}, datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ordered_ingest()),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=run_name, storage_path=path, storage_filesystem=fs, callbacks=callbacks,
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))


def ordered_ingest() -> ray.data.ExecutionOptions:
    """Ray Train's default ingest options with the row order kept: without it the batches depend on which Ray
    Data task finishes first, so two runs on the same bank train different decoders."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def run_bootstrap(cfg: Config, mlflow_run: tuple[str, str] | None = None) -> StageResult:
    """Train all rounds on Ray Train (DDP; NCCL on GPU, gloo on CPU); commit the final (and best) decoder. The
    result's `processed` counts the epochs this run trained."""
    out = bootstrap_output(cfg)
    tags = {"checkpoint": out.part_uri("final.pt")}
    if out.is_committed():
        return StageResult("bootstrap", out.uri, out.manifest(), tags=tags)
    settings_guard.prepare_train_dir(cfg)
    with epoch_lines(sum(cfg.train.round_epochs)) as reporter:  # one console line per epoch on the driver
        result = make_trainer(cfg, "bootstrap", callbacks=[reporter], mlflow_run=mlflow_run).fit()
    last = len(cfg.train.round_epochs) - 1
    out.write_part("final.pt", storage.read_bytes(out.part_uri(f"round-{last}.pt")))
    best = export_best(cfg, result.checkpoint)
    manifest = out.commit({"rounds": last + 1, "epochs": sum(cfg.train.round_epochs), "final": "final.pt",
                       "workers": cfg.train.num_workers, "metrics": result.metrics, **best,
                       "train_checkpoint": result.checkpoint.path if result.checkpoint else None,
                       "settings": settings_guard.record(cfg, "bootstrap")})
    trained = sum(cfg.train.round_epochs) - result.metrics.get("resumed_at", 0) if result.metrics else 0
    return StageResult("bootstrap", out.uri, manifest, trained, tags=tags)


def export_best(cfg: Config, checkpoint: ray.train.Checkpoint | None) -> dict[str, Any]:
    """best.pt from the last Train checkpoint's best state: written at commit, so it always matches the manifest
    (an epoch-time file could hold a discarded attempt's weights after a restart)."""
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as d:
        best = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)["best"]
    if "decoder" not in best:  # no validation ran (train.eval_every=0)
        return {}
    _export(cfg, best["decoder"], best["round"], "best.pt")
    return {"best": "best.pt", "best_epoch": best["global_epoch"], "best_miou": best["val/miou"]}
