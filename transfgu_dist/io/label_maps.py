"""Ground-truth label remapping: raw label PNG values of each public dataset -> the evaluated class ids.

Every table is a 256-entry uint8 lookup (raw value -> class id, 255 = ignored), named like the config preset
that uses it (the authors' per-dataset label handling):

- ``cocostuff171``: stuffthingmaps values are 0-based COCO ids 0-181 (255 unlabeled); the 11 ids COCO never
  uses are dropped and the other 182 - 11 = 171 map to 0-170 in order (things 0-79, stuff 80-170).
- ``cocostuff27``: the PiCIE/STEGO fine-to-coarse table, the COCO-Stuff super-categories: things -> 12
  (0-11), stuff -> 15 (12-26), in the order of :data:`COCO27_NAMES`.
- ``coco80``: things -> 1-80 in id order, every stuff id -> 0 (background).
- ``voc``: VOC 2012 palette indices 0-20 kept (0 = background), 255 (object boundaries) ignored.
- ``cityscapes27``: gtFine labelIds 7-33 -> 0-26 (PiCIE protocol); 0-6 (void) and the rest ignored.
- ``lip19`` / ``lip16`` / ``lip5``: LIP part labels 0-19 (0 = background) as-is, with the left/right pairs
  merged, or grouped into 5 coarse parts.

The layouts ``synthetic`` and ``folder`` have no table: their labels are already the class ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transfgu_dist.config import Config

IGNORE = 255

# fmt: off
# (COCO id, name, super-category); stuffthingmaps PNGs store id - 1.
COCO_THINGS: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"), (8, "truck", "vehicle"),
    (9, "boat", "vehicle"), (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"), (16, "bird", "animal"),
    (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"), (20, "sheep", "animal"),
    (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"),
    (25, "giraffe", "animal"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"), (34, "frisbee", "sports"),
    (35, "skis", "sports"), (36, "snowboard", "sports"), (37, "sports ball", "sports"), (38, "kite", "sports"),
    (39, "baseball bat", "sports"), (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
    (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"), (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"),
    (54, "sandwich", "food"), (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"),
    (62, "chair", "furniture"), (63, "couch", "furniture"), (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"), (78, "microwave", "appliance"),
    (79, "oven", "appliance"), (80, "toaster", "appliance"), (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"), (84, "book", "indoor"), (85, "clock", "indoor"), (86, "vase", "indoor"),
    (87, "scissors", "indoor"), (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
)
COCO_STUFF: tuple[tuple[int, str, str], ...] = tuple(
    (92 + i, name, sup)
    for i, (name, sup) in enumerate((
        ("banner", "textile"), ("blanket", "textile"), ("branch", "plant"), ("bridge", "building"),
        ("building-other", "building"), ("bush", "plant"), ("cabinet", "furniture-stuff"), ("cage", "structural"),
        ("cardboard", "raw-material"), ("carpet", "floor"), ("ceiling-other", "ceiling"), ("ceiling-tile", "ceiling"),
        ("cloth", "textile"), ("clothes", "textile"), ("clouds", "sky"), ("counter", "furniture-stuff"),
        ("cupboard", "furniture-stuff"), ("curtain", "textile"), ("desk-stuff", "furniture-stuff"), ("dirt", "ground"),
        ("door-stuff", "furniture-stuff"), ("fence", "structural"), ("floor-marble", "floor"), ("floor-other", "floor"),
        ("floor-stone", "floor"), ("floor-tile", "floor"), ("floor-wood", "floor"), ("flower", "plant"),
        ("fog", "water"), ("food-other", "food-stuff"), ("fruit", "food-stuff"), ("furniture-other", "furniture-stuff"),
        ("grass", "plant"), ("gravel", "ground"), ("ground-other", "ground"), ("hill", "solid"), ("house", "building"),
        ("leaves", "plant"), ("light", "furniture-stuff"), ("mat", "textile"), ("metal", "raw-material"),
        ("mirror-stuff", "furniture-stuff"), ("moss", "plant"), ("mountain", "solid"), ("mud", "ground"),
        ("napkin", "textile"), ("net", "structural"), ("paper", "raw-material"), ("pavement", "ground"),
        ("pillow", "textile"), ("plant-other", "plant"), ("plastic", "raw-material"), ("platform", "ground"),
        ("playingfield", "ground"), ("railing", "structural"), ("railroad", "ground"), ("river", "water"),
        ("road", "ground"), ("rock", "solid"), ("roof", "building"), ("rug", "textile"), ("salad", "food-stuff"),
        ("sand", "ground"), ("sea", "water"), ("shelf", "furniture-stuff"), ("sky-other", "sky"),
        ("skyscraper", "building"), ("snow", "ground"), ("solid-other", "solid"), ("stairs", "furniture-stuff"),
        ("stone", "solid"), ("straw", "plant"), ("structural-other", "structural"), ("table", "furniture-stuff"),
        ("tent", "building"), ("textile-other", "textile"), ("towel", "textile"), ("tree", "plant"),
        ("vegetable", "food-stuff"), ("wall-brick", "wall"), ("wall-concrete", "wall"), ("wall-other", "wall"),
        ("wall-panel", "wall"), ("wall-stone", "wall"), ("wall-tile", "wall"), ("wall-wood", "wall"),
        ("water-other", "water"), ("waterdrops", "water"), ("window-blind", "window"), ("window-other", "window"),
        ("wood", "solid"),
    ))
)
# The 27 super-categories in the PiCIE/STEGO index order: indoor things, outdoor things, indoor stuff, outdoor stuff.
COCO27_NAMES: tuple[str, ...] = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor", "person",
    "sports", "vehicle", "ceiling", "floor", "food-stuff", "furniture-stuff", "raw-material", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)
VOC_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# Cityscapes labelIds 7..33 in order (0-6 are void: unlabeled, ego vehicle, rectification border, ...).
CITYSCAPES27_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel", "pole",
    "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)
LIP19_NAMES: tuple[str, ...] = (
    "background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks", "pants", "jumpsuits",
    "scarf", "skirt", "face", "left-arm", "right-arm", "left-leg", "right-leg", "left-shoe", "right-shoe",
)
# fmt: on
LIP16_NAMES: tuple[str, ...] = LIP19_NAMES[:14] + ("arm", "leg", "shoe")
LIP5_NAMES: tuple[str, ...] = ("background", "head", "upper-body", "arm", "lower-body", "foot")
_LIP5_GROUPS = {1: (1, 2, 4, 13), 2: (5, 6, 7, 10, 11, 12), 3: (3, 14, 15), 4: (9, 16, 17), 5: (8, 18, 19)}


class LabelMapError(ValueError):
    """No label table fits the configured layout and class count; the message names the keys."""


@dataclass(frozen=True)
class LabelMap:
    name: str
    lut: np.ndarray  # uint8 [256]: raw value -> class id, IGNORE where not scored
    class_names: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        return self.lut[np.asarray(raw, dtype=np.uint8)]


def _table(name: str, mapping: dict[int, int], names: tuple[str, ...]) -> LabelMap:
    lut = np.full(256, IGNORE, np.uint8)
    for raw, cls in mapping.items():
        lut[raw] = cls
    lut.flags.writeable = False
    assert sorted(set(mapping.values())) == list(range(len(names))), name
    return LabelMap(name, lut, names)


def _coco_tables() -> list[LabelMap]:
    things = [coco_id - 1 for coco_id, _, _ in COCO_THINGS]
    stuff = [coco_id - 1 for coco_id, _, _ in COCO_STUFF]
    fine = {raw: i for i, raw in enumerate(things + stuff)}
    fine_names = tuple(n for _, n, _ in COCO_THINGS + COCO_STUFF)
    # "food" / "furniture" are thing super-categories; the stuff ones of the same name carry "-stuff".
    coarse = {coco_id - 1: COCO27_NAMES.index(sup) for coco_id, _, sup in COCO_THINGS + COCO_STUFF}
    coco80 = {**{raw: 0 for raw in stuff}, **{raw: i + 1 for i, raw in enumerate(things)}}
    return [
        _table("cocostuff171", fine, fine_names),
        _table("cocostuff27", coarse, COCO27_NAMES),
        _table("coco80", coco80, ("background",) + tuple(n for _, n, _ in COCO_THINGS)),
    ]


def _lip_tables() -> list[LabelMap]:
    lip16 = {raw: raw for raw in range(14)} | {14: 14, 15: 14, 16: 15, 17: 15, 18: 16, 19: 16}
    lip5 = {0: 0} | {raw: group for group, raws in _LIP5_GROUPS.items() for raw in raws}
    return [
        _table("lip19", {raw: raw for raw in range(20)}, LIP19_NAMES),
        _table("lip16", lip16, LIP16_NAMES),
        _table("lip5", lip5, LIP5_NAMES),
    ]


TABLES: dict[str, LabelMap] = {
    t.name: t
    for t in (
        *_coco_tables(),
        _table("voc", {raw: raw for raw in range(21)}, VOC_NAMES),
        _table("cityscapes27", {raw: raw - 7 for raw in range(7, 34)}, CITYSCAPES27_NAMES),
        *_lip_tables(),
    )
}

# layout -> {data.n_classes: table}; layouts absent here read their labels as class ids directly.
BY_LAYOUT: dict[str, dict[int, str]] = {
    "cocostuff": {171: "cocostuff171", 27: "cocostuff27", 81: "coco80"},
    "voc": {21: "voc"},
    "cityscapes": {27: "cityscapes27"},
    "lip": {20: "lip19", 17: "lip16", 6: "lip5"},
}
IDENTITY_LAYOUTS = ("synthetic", "folder")


def table_name(layout: str, n_classes: int) -> str | None:
    """The table for `layout` scored with `n_classes` classes; None for layouts whose labels are class ids."""
    if layout in IDENTITY_LAYOUTS:
        return None
    if layout not in BY_LAYOUT:
        raise LabelMapError(
            f"data.layout '{layout}': no label table (known layouts: {', '.join((*IDENTITY_LAYOUTS, *BY_LAYOUT))})"
        )
    choices = BY_LAYOUT[layout]
    if n_classes not in choices:
        known = ", ".join(f"{n} ({name})" for n, name in choices.items())
        raise LabelMapError(
            f"data.n_classes = {n_classes} does not fit data.layout '{layout}' (expected one of {known})"
        )
    return choices[n_classes]


def for_config(cfg: Config) -> LabelMap | None:
    """The table `cfg` evaluates with (data.layout, data.n_classes); None when labels are read as-is."""
    name = table_name(cfg.data.layout, cfg.data.n_classes)
    return TABLES[name] if name else None


def _resolve(which: str | Config | LabelMap | None) -> LabelMap | None:
    if which is None or isinstance(which, LabelMap):
        return which
    if isinstance(which, str):
        if which in IDENTITY_LAYOUTS:
            return None
        if which not in TABLES:
            raise LabelMapError(
                f"no label table '{which}' (known: {', '.join(TABLES)}, or {', '.join(IDENTITY_LAYOUTS)})"
            )
        return TABLES[which]
    return for_config(which)


def remap_label(which: str | Config | LabelMap | None, raw: np.ndarray) -> np.ndarray:
    """Raw uint8 label map -> uint8 class ids with 255 for ignored pixels.

    `which`: a table / preset name (``cocostuff27``, ``coco80``, ``cityscapes27``, ``lip5``, ...), a Config
    (its data.layout and data.n_classes pick the table), a LabelMap, or None / ``synthetic`` / ``folder``
    (identity).
    """
    table = _resolve(which)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"expected a uint8 label map, got {raw.dtype}")
    return raw.copy() if table is None else table(raw)


def class_names(cfg: Config) -> list[str] | None:
    """The class names of `cfg`'s table, or None for layouts without one."""
    table = for_config(cfg)
    return list(table.class_names) if table else None
