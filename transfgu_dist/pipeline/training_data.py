"""Bootstrap's training set: the pseudo-label bank's rows joined with their images decoded once, and each epoch's
shuffled shards of it.

Before the first epoch, Ray Data CPU tasks turn each bank part into a training part of the same name and row order:
the bank's columns (paths kept relative to data.root) plus `image`, the image decoded and resized once by the
profile's training rule (resizing(cfg.data).images: plain bilinear under `reference`, antialiased under `paper`)
and stored as uint8 (H*W*3). Every epoch then reads these parts instead of decoding and resizing every image again.

uint8 rounds the resized values to the nearest 1/255 (at most 0.5/255 from the float the resize gives, exact when
the image already has the training size or the resize is `nearest`). Images that can no longer be read are left
out and listed as bad, as the per-epoch decode dropped them. The output lives beside the bank, at
`<inputs root>/train_images` (the `source` when reused, so a sweep's trials and a run's seeds read one cache), under the
stage output protocol (parts published whole, `_SUCCESS.json` last, on local disk or S3); an interrupted build
resumes at the parts missing, and a cache made from another bank, size or resize rule is rebuilt.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.collective
import torch

from transfgu_dist.config import Config
from transfgu_dist.io import bank, parts, storage
from transfgu_dist.io.datasets import image_uri
from transfgu_dist.io.image_pool import load_images, to_uint8
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.io.storage_errors import StorageError
from transfgu_dist.method.resizing import resizing
from transfgu_dist.pipeline import contract

log = logging.getLogger(__name__)
FOLDER = "train_images"


def cache_output(cfg: Config) -> StageOutput:
    return StageOutput(storage.join(cfg.inputs_root, FOLDER))


def cache_key(cfg: Config) -> dict:
    """What the cached images depend on: the bank (its commit time), the training size and the resize rule."""
    return {
        "bank_committed_at": contract.output(cfg, "pseudo_label").manifest()["committed_at"],
        "image_size": list(cfg.train.image_size),
        "resize": resizing(cfg.data).images,
    }


def decode_rows(table: pa.Table, cfg: Config) -> tuple[pa.Table, dict[str, str]]:
    """Bank rows -> the rows whose image could be read, with `image` (uint8, H*W*3 per row) appended; and the
    unreadable ones' id -> reason."""
    batch = load_images(
        {
            "image_id": np.array(table.column("image_id").to_pylist(), dtype=object),
            "uri": np.array([image_uri(cfg, p) for p in table.column("path").to_pylist()], dtype=object),
        },
        cfg.train.image_size,
        resizing(cfg.data).images,
    )
    ok = batch["ok"]
    images = to_uint8(batch["image"][ok])
    kept = table.filter(pa.array(ok))
    bad = {str(i): str(e) for i, e in zip(batch["image_id"][~ok], batch["error"][~ok])}
    return kept.append_column(
        "image", parts.fixed_list(images.reshape(len(images), int(np.prod(images.shape[1:]))), pa.uint8())
    ), bad


def write_cache_parts(batch: dict[str, np.ndarray], cfg: Config, out_uri: str) -> dict[str, np.ndarray]:
    """Ray Data CPU task: each bank part named in `batch["part"]` -> the training part of the same name."""
    out, bank_out = StageOutput(out_uri), contract.output(cfg, "pseudo_label")
    for name in batch["part"]:
        table = parts.read_table([bank_out.part_uri(str(name))])
        kept, bad = decode_rows(table, cfg)
        if bad:
            log.warning("train_images: %d unreadable images left out of %s: %s", len(bad), name, ", ".join(bad))
        ids = kept.column("image_id").to_pylist()
        parts.write_part(out, kept, ids, sorted(bad), bad, name=str(name))
    return {"part": batch["part"]}


def build_cache(cfg: Config) -> dict:
    """Decode the bank's images once (Ray Data CPU tasks, one per bank part not yet cached) and commit the cache;
    returns its manifest. A committed cache of the same key is kept as it is."""
    bank_out = contract.output(cfg, "pseudo_label")
    names = [u.rsplit("/", 1)[-1] for u in parts.part_uris(bank_out)]
    out, key = cache_output(cfg), cache_key(cfg)
    if out.is_committed():
        manifest = out.manifest()
        if {k: manifest.get(k) for k in key} == key:
            return manifest
        log.info("%s: made from another bank or image size; rebuilding", out.uri)
        storage.delete(out.uri)
    bank.check_part(bank_out.part_uri(names[0]), cfg.pseudo.terms_dtype)
    pending = sorted(set(names) - out.done_parts()) if storage.exists(out.uri) else names
    log.info("%s: decoding the images of %d of %d bank parts", out.uri, len(pending), len(names))
    if pending:
        ds = ray.data.from_items([{"part": n} for n in pending])
        ds = ds.map_batches(
            write_cache_parts,
            fn_kwargs={"cfg": cfg, "out_uri": out.uri},
            batch_size=1,
            num_cpus=cfg.resources.decode_cpus,
        )
        ds.context.enable_progress_bars = False
        for _ in ds.iter_rows():
            pass
    cover = {n: c for n, c in parts.coverage(out).items() if n in names}
    done, bad = parts.covered(cover)
    if not done:
        raise StorageError(
            cfg.data_root, f"none of the {len(bad)} images of the bank {bank_out.uri} could be read there"
        )
    return out.commit(
        {**key, "images": len(done), "bad_images": sorted(bad), "part_records": parts.records(out, cover)}
    )


def read_cache(cfg: Config) -> ray.data.Dataset:
    """The committed cache as a Ray dataset of its rows, in the bank's part and row order."""
    uris = parts.part_uris(cache_output(cfg))
    fs, _ = storage.filesystem(uris[0])
    ray.data.DataContext.get_current().use_datasource_v2 = False  # as bank.read: the part list is known
    return ray.data.read_parquet([storage.filesystem(u)[1] for u in uris], filesystem=fs)


def train_rows(batch: dict[str, np.ndarray], cfg: Config) -> dict[str, np.ndarray]:
    """Ray Data task: cached rows as arrays, image (n, H, W, 3) uint8 and the bank's map columns (bank.unpack: terms
    reshaped to (K, h, w), decoded to fp32 maps on the trainer by bank.with_maps, so fp16 terms cross the object
    store)."""
    n, (h, w) = len(batch["scale"]), cfg.train.image_size
    return {"image": np.stack(batch["image"]).reshape(n, h, w, 3), **bank.unpack(batch)}


def epoch_seed(cfg: Config, epoch: int) -> int:
    """The shuffle seed of a global epoch: a function of (train.seed, epoch) only, so a resumed run reshuffles as the
    uninterrupted one did."""
    return int(np.random.SeedSequence([cfg.train.seed, epoch]).generate_state(1)[0])


def training_dataset(cfg: Config, epoch: int | None = None) -> ray.data.Dataset:
    """The cached training rows (build_cache first); with `epoch`, globally reshuffled by Ray Data (the authors
    reshuffle the whole training set, repeats included, every epoch)."""
    ds = read_cache(cfg)
    if cfg.train.data_fraction < 1:
        ds = ds.random_sample(cfg.train.data_fraction, seed=cfg.train.seed)
    if cfg.train.epoch_repeat > 1:  # reference: VOC and Cityscapes see their training set 20 times per epoch
        ds = ds.union(*[ds] * (cfg.train.epoch_repeat - 1))
    if epoch is not None:
        ds = ds.random_shuffle(seed=epoch_seed(cfg, epoch))
    return ds.map_batches(train_rows, fn_kwargs={"cfg": cfg}, batch_size=cfg.train.batch_size, num_cpus=1)


def epoch_shard(cfg: Config, epoch: int) -> ray.data.DataIterator:
    """This worker's rows of global epoch `epoch`. train.shuffle=global: rank 0 reshuffles the whole training set
    (training_dataset) and splits it equally between the workers, order kept; else the trainer's shard."""
    if cfg.train.shuffle != "global":
        return ray.train.get_dataset_shard("train")
    ctx = ray.train.get_context()
    shards = None
    if ctx.get_world_rank() == 0:
        ds = training_dataset(cfg, epoch)
        ds.context.execution_options, ds.context.enable_progress_bars = ordered_ingest(), False
        shards = ds.streaming_split(ctx.get_world_size(), equal=True)
    if ctx.get_world_size() > 1:
        shards = ray.train.collective.broadcast_from_rank_zero(shards)
    return shards[ctx.get_world_rank()]


def ordered_ingest() -> ray.data.ExecutionOptions:
    """Ray Train's default ingest options with the row order kept: without it the batches depend on which Ray
    Data task finishes first, so two runs on the same bank train different decoders."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


class EpochFeed:
    """This worker's batches, epoch by epoch. Under train.shuffle=global the next epoch's shard is made (a collective
    call, at the same point on every rank) and its first batches pulled by a thread while this epoch trains, so its
    shuffle and Ray Data start-up overlap the training steps instead of waiting at the epoch's start. The batches
    and their order are those of epoch_shard either way."""

    DONE = object()

    def __init__(self, cfg: Config, dev: torch.device, epochs: int):
        self.cfg, self.dev, self.epochs = cfg, dev, epochs
        self.ahead: dict[int, queue.Queue] = {}

    def _iterator(self, epoch: int) -> Any:
        local = self.cfg.train.shuffle == "local"
        return epoch_shard(self.cfg, epoch).iter_torch_batches(
            batch_size=self.cfg.train.batch_size,
            device=self.dev,
            local_shuffle_buffer_size=4 * self.cfg.train.batch_size if local else None,
            local_shuffle_seed=self.cfg.train.seed + epoch if local else None,
            drop_last=self.cfg.train.drop_last,
        )

    def _start(self, epoch: int) -> None:
        feed: queue.Queue = queue.Queue(maxsize=2)

        def fill(batches: Any) -> None:
            try:
                for batch in batches:
                    feed.put(batch)
                feed.put(self.DONE)
            except Exception as e:  # noqa: BLE001 - raised in the training thread when it reaches this point
                feed.put(e)

        threading.Thread(target=fill, args=(self._iterator(epoch),), daemon=True, name=f"feed-{epoch}").start()
        self.ahead[epoch] = feed

    def batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of global epoch `epoch`."""
        if self.cfg.train.shuffle != "global":
            yield from self._iterator(epoch)
            return
        if epoch not in self.ahead:
            self._start(epoch)
        if epoch + 1 < self.epochs:
            self._start(epoch + 1)
        feed = self.ahead.pop(epoch)
        while (item := feed.get()) is not self.DONE:
            if isinstance(item, Exception):
                raise item
            yield item
