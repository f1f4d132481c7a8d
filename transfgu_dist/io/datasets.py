"""Which images (and ground-truth labels) make up a split, for each supported layout.

Layouts (``data.layout``; every root may be a local path or ``s3://bucket/prefix``), as the public archives
extract (the layouts the authors' README gives):

- ``synthetic``: ``images/<split>/<id>.png`` + ``labels/<split>/<id>.png`` + ``classes.txt``
  (transfgu_dist.io.synthetic).
- ``cocostuff``: ``images/{train2017,val2017}/<id>.jpg`` + ``annotations/{train2017,val2017}/<id>.png`` (the
  stuffthingmaps; ``stuffthingmaps_trainval2017/`` or ``stuffthingmaps/`` also accepted in place of
  ``annotations/``); split ``train``/``val`` means ``train2017``/``val2017``. When
  ``annotations/instances_<split>2017.json`` is present only images with at least one instance annotation are
  used (reference: 117,266 train / 4,952 val). The 171 / 27 / COCO-80 class tables: transfgu_dist.io.label_maps.
- ``voc``: ``JPEGImages/<id>.jpg`` + ``SegmentationClass/<id>.png`` + ``ImageSets/Segmentation/<split>.txt``
  (the contents of ``VOCdevkit/VOC2012``).
- ``cityscapes``: ``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png`` +
  ``gtFine/<split>/<city>/<id>_gtFine_labelIds.png``.
- ``lip``: ``<split>_images/<id>.jpg`` + ``<split>_segmentations/<id>.png`` + ``<split>_id.txt``.
- ``folder``: any images below the root, no labels (training only).

``data.train_list`` / ``data.val_list`` name a file of image ids (one a line; a file extension is dropped) that
restricts the split, e.g. the curated COCO lists of PiCIE.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from transfgu_dist.config import Config
from transfgu_dist.io import label_maps, storage, synthetic

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


LABEL_FREE_LAYOUTS = ("folder",)


def has_labels(cfg: Config) -> bool:
    """Whether the layout has ground truth (a val split to score); `folder` has none."""
    return cfg.data.layout not in LABEL_FREE_LAYOUTS


class DatasetLayoutError(FileNotFoundError):
    """The dataset root does not have the expected layout; the message names what is missing."""


@dataclass(frozen=True)
class Sample:
    image_id: str
    image: str  # URI of the image file
    label: str | None = None  # URI of the ground-truth label PNG, when the layout has labels


def ensure_synthetic(cfg: Config) -> None:
    """Generate the synthetic scenes once (local roots only), so the demo needs no download."""
    root = cfg.data_root
    if cfg.data.layout != "synthetic" or storage.exists(storage.join(root, "classes.txt")):
        return
    if root.startswith("s3://"):
        raise DatasetLayoutError(f"{root}: no synthetic dataset there (stage one with jobs/stage_dataset.py)")
    size = (cfg.data.synthetic_size, cfg.data.synthetic_size)
    synthetic.write_dataset(root, cfg.data.synthetic_train, cfg.data.synthetic_val, size=size, seed=cfg.seed)


def _stem(uri: str) -> str:
    return PurePosixPath(uri).stem


def _files(uri: str, what: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[str]:
    if not storage.exists(uri):
        raise DatasetLayoutError(f"{uri}: missing {what} (nothing is downloaded: put the id list there)")
    files = storage.list_files(uri, suffixes)
    if not files:
        raise DatasetLayoutError(f"{uri}: no files found ({what}; expected files ending in {', '.join(suffixes)})")
    return files


def _by_id(uris: list[str], suffix: str = "") -> dict[str, str]:
    """{id: uri}: the file name without `suffix` (or without its extension when no suffix is given)."""
    name = lambda u: PurePosixPath(u).name[: -len(suffix)] if suffix else _stem(u)  # noqa: E731
    return {name(u): u for u in uris}


def _examples(ids: set[str] | list[str], n: int = 3) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "")


def _read_ids(uri: str, what: str) -> list[str]:
    """Ids of a list file, one a line (blank lines and '#' comments skipped, an image extension dropped)."""
    if not storage.exists(uri):
        raise DatasetLayoutError(f"{uri}: missing {what} (nothing is downloaded: put the id list there)")
    ids = []
    for line in storage.read_bytes(uri).decode().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            item = PurePosixPath(line.split()[0]).name
            ids.append(item.rsplit(".", 1)[0] if item.lower().endswith(IMAGE_SUFFIXES) else item)
    if not ids:
        raise DatasetLayoutError(f"{uri}: {what} lists no image ids")
    return ids


def _paired(images: dict[str, str], labels: dict[str, str], label_dir: str, what: str) -> list[Sample]:
    """Samples of every image; an image without its label PNG is a layout error naming the first few."""
    missing = images.keys() - labels.keys()
    if missing:
        raise DatasetLayoutError(
            f"{label_dir}: missing the {what} of {len(missing)} of {len(images)} images (e.g. {_examples(missing)})"
        )
    return [Sample(i, images[i], labels[i]) for i in images]


def _synthetic(cfg: Config, root: str, split: str) -> list[Sample]:
    images = _files(storage.join(root, "images", split), f"the {split} images of the synthetic layout")
    label_dir = storage.join(root, "labels", split)
    return [Sample(_stem(u), u, storage.join(label_dir, f"{_stem(u)}.png")) for u in images]


def _folder(cfg: Config, root: str, split: str) -> list[Sample]:
    if split != cfg.data.train_split:
        raise DatasetLayoutError(f"{root}: a plain image folder has no labels, so no '{split}' split to evaluate")
    return [
        Sample(u[len(root) :].strip("/").rsplit(".", 1)[0].replace("/", "__"), u)
        for u in _files(root, "a folder of images")
    ]


COCO_LABEL_DIRS = ("annotations", "stuffthingmaps_trainval2017", "stuffthingmaps")


def coco_split_dir(split: str) -> str:
    """`train` -> `train2017`; a name that already carries its year is kept."""
    return split if split[-4:].isdigit() else f"{split}2017"


def coco_annotated_stems(instances: dict) -> set[str]:
    """File stems of the images with at least one instance annotation (the reference's `imgToAnns` keys)."""
    annotated = {a["image_id"] for a in instances.get("annotations", [])}
    return {PurePosixPath(img["file_name"]).stem for img in instances.get("images", []) if img["id"] in annotated}


def _cocostuff(cfg: Config, root: str, split: str) -> list[Sample]:
    d = coco_split_dir(split)
    image_dir = storage.join(root, "images", d)
    images = _by_id(_files(image_dir, f"the COCO {d} images (expected <root>/images/{d}/*.jpg from {d}.zip)"))
    candidates = [storage.join(root, sub, d) for sub in COCO_LABEL_DIRS]
    label_dir = next((c for c in candidates if storage.exists(c)), None)
    if label_dir is None:
        raise DatasetLayoutError(
            f"{candidates[0]}: missing the COCO-Stuff {d} label PNGs (expected "
            f"<root>/{{{','.join(COCO_LABEL_DIRS)}}}/{d}/*.png from "
            f"stuffthingmaps_trainval2017.zip)"
        )
    labels = _by_id(storage.list_files(label_dir, (".png",)))
    samples = _paired(images, labels, label_dir, "stuffthingmaps label PNG")
    instances = storage.join(root, "annotations", f"instances_{d}.json")
    if storage.exists(instances):
        try:
            keep = coco_annotated_stems(json.loads(storage.read_bytes(instances)))
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetLayoutError(
                f"{instances}: expected COCO instances JSON with 'images' and 'annotations' ({type(e).__name__}: {e})"
            ) from e
        kept = [s for s in samples if s.image_id in keep]
        log.info(
            "%s: %d of %d %s images have instance annotations (%s); the others are left out",
            root,
            len(kept),
            len(samples),
            d,
            instances,
        )
        samples = kept
    return samples


def _voc(cfg: Config, root: str, split: str) -> list[Sample]:
    list_uri = storage.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    if not storage.exists(list_uri):
        nested = storage.join(root, "VOCdevkit", "VOC2012")
        hint = (
            f"; the archive's VOC2012 folder is at {nested}: use data.root={nested}" if storage.exists(nested) else ""
        )
        raise DatasetLayoutError(
            f"{list_uri}: missing the VOC 2012 '{split}' image list (expected "
            f"<root>/ImageSets/Segmentation/{split}.txt, <root> = VOCdevkit/VOC2012{hint})"
        )
    ids = _read_ids(list_uri, f"the VOC '{split}' image list")
    image_dir, label_dir = storage.join(root, "JPEGImages"), storage.join(root, "SegmentationClass")
    images = _by_id(_files(image_dir, "the VOC JPEGImages folder (expected <root>/JPEGImages/<id>.jpg)"))
    labels = _by_id(
        _files(label_dir, "the VOC SegmentationClass folder (expected <root>/SegmentationClass/<id>.png)", (".png",))
    )
    missing = set(ids) - images.keys()
    if missing:
        raise DatasetLayoutError(
            f"{image_dir}: missing {len(missing)} of the {len(ids)} images listed in {list_uri} "
            f"(e.g. {_examples(missing)})"
        )
    return _paired({i: images[i] for i in ids}, labels, label_dir, "SegmentationClass PNG")


CITYSCAPES_IMAGE, CITYSCAPES_LABEL = "_leftImg8bit.png", "_gtFine_labelIds.png"


def _cityscapes(cfg: Config, root: str, split: str) -> list[Sample]:
    image_dir, label_dir = storage.join(root, "leftImg8bit", split), storage.join(root, "gtFine", split)
    images = _by_id(
        _files(
            image_dir,
            f"the Cityscapes {split} images (expected <root>/leftImg8bit/{split}/<city>/"
            f"*{CITYSCAPES_IMAGE} from leftImg8bit_trainvaltest.zip)",
            (CITYSCAPES_IMAGE,),
        ),
        CITYSCAPES_IMAGE,
    )
    labels = _by_id(
        _files(
            label_dir,
            f"the Cityscapes {split} labels (expected <root>/gtFine/{split}/<city>/"
            f"*{CITYSCAPES_LABEL} from gtFine_trainvaltest.zip)",
            (CITYSCAPES_LABEL,),
        ),
        CITYSCAPES_LABEL,
    )
    return _paired(images, labels, label_dir, f"*{CITYSCAPES_LABEL}")


def _lip(cfg: Config, root: str, split: str) -> list[Sample]:
    list_uri = storage.join(root, f"{split}_id.txt")
    ids = _read_ids(list_uri, f"the LIP {split} id list (expected <root>/{split}_id.txt)")
    image_dir, label_dir = storage.join(root, f"{split}_images"), storage.join(root, f"{split}_segmentations")
    images = _by_id(
        _files(image_dir, f"the LIP {split} images (expected <root>/{split}_images/<id>.jpg from TrainVal_images.zip)")
    )
    labels = _by_id(
        _files(
            label_dir,
            f"the LIP {split} part labels (expected <root>/{split}_segmentations/<id>.png "
            "from TrainVal_parsing_annotations.zip)",
            (".png",),
        )
    )
    missing = set(ids) - images.keys()
    if missing:
        raise DatasetLayoutError(
            f"{image_dir}: missing {len(missing)} of the {len(ids)} images listed in {list_uri} "
            f"(e.g. {_examples(missing)})"
        )
    return _paired({i: images[i] for i in ids}, labels, label_dir, "part label PNG")


READERS: dict[str, Callable[[Config, str, str], list[Sample]]] = {
    "synthetic": _synthetic,
    "folder": _folder,
    "cocostuff": _cocostuff,
    "voc": _voc,
    "cityscapes": _cityscapes,
    "lip": _lip,
}


def _restrict(cfg: Config, split: str, samples: list[Sample]) -> list[Sample]:
    """Keep the ids of `data.train_list` / `data.val_list` (curated splits; a relative name is read under the data
    root); unknown ids are reported."""
    list_uri = (
        cfg.data.train_list
        if split == cfg.data.train_split
        else cfg.data.val_list
        if split == cfg.data.val_split
        else None
    )
    if not list_uri:
        return samples
    if "://" not in list_uri and not list_uri.startswith("/"):  # a bare name lives under the data root
        list_uri = storage.join(cfg.data_root, list_uri)
    ids = set(_read_ids(list_uri, f"the image list of the '{split}' split"))
    kept = [s for s in samples if s.image_id in ids]
    unknown = ids - {s.image_id for s in kept}
    if unknown:
        log.warning(
            "%s: %d of its %d ids are not (usable) images of the '%s' split, e.g. %s",
            list_uri,
            len(unknown),
            len(ids),
            split,
            _examples(unknown),
        )
    if not kept:
        named = _examples([s.image_id for s in samples])
        raise DatasetLayoutError(
            f"{list_uri}: none of its {len(ids)} ids is an image of the '{split}' split "
            f"(e.g. {_examples(ids)}; images are named like {named})"
        )
    log.info("%s: %d of %d '%s' images kept by %s", cfg.data_root, len(kept), len(samples), split, list_uri)
    return kept


def relative_path(cfg: Config, uri: str) -> str:
    """An image's path relative to `cfg.data_root` (what an output stores, so a moved output or data root keeps
    working); a URI outside the root is kept whole."""
    root = cfg.data_root.rstrip("/") + "/"
    return uri[len(root) :] if uri.startswith(root) else uri


def image_uri(cfg: Config, path: str) -> str:
    """The URI of an image stored as `relative_path` (a whole URI or absolute path is returned as is)."""
    return path if "://" in path or path.startswith("/") else storage.join(cfg.data_root, path)


def list_samples(cfg: Config, split: str) -> list[Sample]:
    """Samples of `split` sorted by id, restricted by the split's id list, truncated to `data.limit`.

    Raises DatasetLayoutError naming the missing path and what was expected there, and LabelMapError when
    data.n_classes does not fit the layout (checked here so a wrong value fails before any compute).
    """
    root, layout = cfg.data_root, cfg.data.layout
    if layout not in READERS:
        raise DatasetLayoutError(f"data.layout '{layout}' has no reader (supported: {', '.join(READERS)})")
    label_maps.for_config(cfg)
    samples = _restrict(cfg, split, READERS[layout](cfg, root, split))
    samples.sort(key=lambda s: s.image_id)
    return samples[: cfg.data.limit] if cfg.data.limit else samples
