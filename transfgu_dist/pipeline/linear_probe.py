"""Training the linear probe (method.probe; supervised, `probe.enabled`) on Ray Train: one worker reads the train
split's labelled images at the eval size (Ray Data), forwards them through the frozen encoder and fits the 1x1 head
with pixel cross-entropy for `probe.epochs` epochs. The evaluate stage scores it on val (results_table)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from transfgu_dist.config import ARCHS, Config
from transfgu_dist.io import storage
from transfgu_dist.io.datasets import list_samples
from transfgu_dist.io.image_pool import cluster_gpus, images_to_device
from transfgu_dist.io.label_maps import IGNORE
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.io.weights import build_encoder
from transfgu_dist.method.encoder import normalize
from transfgu_dist.method.precision import autocast
from transfgu_dist.method.probe import LinearProbe, probe_step
from transfgu_dist.pipeline.ray_setup import fit
from transfgu_dist.pipeline.scoring import val_dataset

PROBE_FILE = "linear_probe.pt"


def new_probe(cfg: Config) -> LinearProbe:
    """The untrained head (encoder width -> data.n_classes), seeded by `probe.seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.probe.seed)
        return LinearProbe(ARCHS[cfg.encoder.arch][1], cfg.data.n_classes)


def probe_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop: each epoch one pass over the worker's shard in order; the head's weights are the
    last report's checkpoint."""
    cfg: Config = config["cfg"]
    dev = ray.train.torch.get_device()
    encoder = build_encoder(cfg.encoder).to(dev).eval()
    probe = ray.train.torch.prepare_model(new_probe(cfg))
    optimizer = torch.optim.Adam(probe.parameters(), lr=cfg.probe.lr)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(cfg.probe.epochs):
        losses = []
        for batch in shard.iter_batches(batch_size=cfg.probe.batch_size, batch_format="numpy"):
            images = images_to_device(batch, dev)
            with torch.no_grad(), autocast(dev, cfg.eval.precision):
                patch = encoder(normalize(images)).patch.float()
            gt = torch.as_tensor(batch["gt"], device=dev)
            loss = probe_step(probe, optimizer, patch, gt, IGNORE)
            if loss is not None:
                losses.append(loss)
        metrics = {"epoch": epoch, "loss": sum(losses) / max(len(losses), 1), "steps": len(losses)}
        with tempfile.TemporaryDirectory() as d:
            state = getattr(probe, "module", probe).state_dict()
            torch.save({k: v.cpu() for k, v in state.items()}, Path(d) / "probe.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_probe(cfg: Config, out: StageOutput) -> tuple[LinearProbe, dict[str, float]]:
    """Fit the probe on the train split's labelled images (Ray Train's files under `<output>/ray_train`), write it
    as `<out>/linear_probe.pt`; returns it and its last epoch's loss and steps."""
    samples = [s for s in list_samples(cfg, cfg.data.train_split) if s.label]
    if not samples:
        raise ValueError(f"probe.enabled: the '{cfg.data.train_split}' split has no labelled image to train it on")
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else cluster_gpus() > 0
    path, fs = storage.ray_storage(storage.join(cfg.output, "ray_train"))
    trainer = ray.train.torch.TorchTrainer(
        probe_loop,
        train_loop_config={"cfg": cfg},
        datasets={"train": val_dataset(cfg, samples)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.train.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(name="linear_probe", storage_path=path, storage_filesystem=fs),
    )
    result = fit(trainer)
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "probe.pt", map_location="cpu", weights_only=True)
    probe = new_probe(cfg)
    probe.load_state_dict(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    out.write_part(PROBE_FILE, buf.getvalue())
    return probe.eval(), {"loss": result.metrics["loss"], "steps": result.metrics["steps"]}
