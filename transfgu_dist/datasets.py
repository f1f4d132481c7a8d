"""Which images (and ground-truth labels) make up a split, for each supported layout."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from transfgu_dist import storage, synthetic
from transfgu_dist.config import Config

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DatasetLayoutError(FileNotFoundError):
    """The dataset root does not have the expected layout; the message names what is missing."""


@dataclass(frozen=True)
class Sample:
    image_id: str
    image: str               # URI of the image file
    label: str | None = None # URI of the ground-truth label PNG, when the layout has labels


def data_root(cfg: Config) -> str:
    """The dataset root; the synthetic layout defaults to a folder under the run's output."""
    return cfg.data.root or storage.join(cfg.output, "data")


def ensure_synthetic(cfg: Config) -> None:
    """Generate the synthetic scenes once (local roots only), so the demo needs no download."""
    root = data_root(cfg)
    if cfg.data.layout != "synthetic" or storage.exists(storage.join(root, "classes.txt")):
        return
    if root.startswith("s3://"):
        raise DatasetLayoutError(f"{root}: no synthetic dataset there (stage one with jobs/stage_dataset.py)")
    size = (cfg.data.synthetic_size, cfg.data.synthetic_size)
    synthetic.write_dataset(root, cfg.data.synthetic_train, cfg.data.synthetic_val, size=size, seed=cfg.seed)


def _stem(uri: str) -> str:
    return PurePosixPath(uri).stem


def _files(uri: str, what: str) -> list[str]:
    if not storage.exists(uri):
        raise DatasetLayoutError(f"{uri}: missing {what}")
    files = storage.list_files(uri, IMAGE_SUFFIXES)
    if not files:
        raise DatasetLayoutError(f"{uri}: no images found ({what}; expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    return files


def list_samples(cfg: Config, split: str) -> list[Sample]:
    """Samples of `split` sorted by id, truncated to `data.limit`."""
    root, layout = data_root(cfg), cfg.data.layout
    if layout == "synthetic":
        images = _files(storage.join(root, "images", split), f"the {split} images of the synthetic layout")
        label_dir = storage.join(root, "labels", split)
        samples = [Sample(_stem(u), u, storage.join(label_dir, f"{_stem(u)}.png")) for u in images]
    elif layout == "folder":
        if split != cfg.data.train_split:
            raise DatasetLayoutError(f"{root}: a plain image folder has no labels, so no '{split}' split to evaluate")
        samples = [Sample(u[len(root):].strip("/").rsplit(".", 1)[0].replace("/", "__"), u)
                   for u in _files(root, "a folder of images")]
    else:
        raise DatasetLayoutError(f"data.layout '{layout}' has no reader yet (supported: synthetic, folder)")
    samples.sort(key=lambda s: s.image_id)
    return samples[: cfg.data.limit] if cfg.data.limit else samples
