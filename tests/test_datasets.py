"""Dataset readers on tiny fixtures in the real public layouts (generated here, real class ids), local and on a
real moto S3 server; the label tables checked against hand-written values."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfgu_dist.config import load_config
from transfgu_dist.io import label_maps, storage
from transfgu_dist.io.datasets import DatasetLayoutError, list_samples
from transfgu_dist.io.images import decode_label
from transfgu_dist.io.label_maps import IGNORE, LabelMapError, remap_label
from transfgu_dist.io.storage_errors import StorageError

ROOT = Path(__file__).resolve().parents[1]
H = W = 16


def stage_module():
    spec = importlib.util.spec_from_file_location("stage_dataset", ROOT / "jobs" / "stage_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_label(path: Path, values: list[int], palette: bool = False) -> None:
    """A label PNG whose pixels cycle through `values` (uint8 'L', or 'P' like VOC)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = np.resize(np.asarray(values, np.uint8), H * W).reshape(H, W)
    if palette:
        img = Image.frombytes("P", (W, H), label.tobytes())
        img.putpalette([c for i in range(256) for c in (i, 255 - i, (7 * i) % 256)])
    else:
        img = Image.fromarray(label)
    img.save(path)


def read_label(uri: str) -> np.ndarray:
    return decode_label(storage.read_bytes(uri), uri)


def cfg_for(root: str | Path, preset: str, *extra: str):
    return load_config(overrides=[f"preset={preset}", f"data.root={root}", *extra])


# ----------------------------------------------------------------------------------------------- label tables

# raw stuffthingmaps value (COCO id - 1) -> (171-class id, 27-class id, COCO-80 id), written out by hand
COCO_EXPECTED = {
    0: (0, 9, 1),  # person -> person
    1: (1, 11, 2),  # bicycle -> vehicle
    11: (IGNORE,) * 3,  # COCO id 12 is unused
    12: (11, 8, 12),  # stop sign -> outdoor
    52: (47, 2, 48),  # banana -> food (things)
    61: (56, 3, 57),  # chair -> furniture (things)
    89: (79, 4, 80),  # toothbrush -> indoor, the last thing
    90: (IGNORE,) * 3,  # COCO id 91 is unused
    91: (80, 17, 0),  # banner -> textile, the first stuff class; stuff is COCO-80 background
    100: (89, 13, 0),  # carpet -> floor
    120: (109, 14, 0),  # food-other -> food (stuff)
    123: (112, 22, 0),  # grass -> plant
    156: (145, 23, 0),  # sky-other -> sky
    170: (159, 18, 0),  # wall-brick -> wall
    181: (170, 24, 0),  # wood -> solid, the last class
    182: (IGNORE,) * 3,  # not a COCO-Stuff value
    255: (IGNORE,) * 3,  # unlabeled
}
CITYSCAPES_EXPECTED = {
    0: IGNORE,
    1: IGNORE,
    6: IGNORE,
    7: 0,
    8: 1,
    11: 4,
    23: 16,
    24: 17,
    26: 19,
    33: 26,
    34: IGNORE,
    255: IGNORE,
}
LIP_EXPECTED = {  # raw -> (lip19, lip16, lip5)
    0: (0, 0, 0),
    1: (1, 1, 1),
    2: (2, 2, 1),
    3: (3, 3, 3),
    4: (4, 4, 1),
    5: (5, 5, 2),
    8: (8, 8, 5),
    9: (9, 9, 4),
    12: (12, 12, 2),
    13: (13, 13, 1),
    14: (14, 14, 3),
    15: (15, 14, 3),
    16: (16, 15, 4),
    17: (17, 15, 4),
    18: (18, 16, 5),
    19: (19, 16, 5),
    20: (IGNORE,) * 3,
    255: (IGNORE,) * 3,
}


def test_coco_tables_by_hand():
    raw = np.array(list(COCO_EXPECTED), np.uint8)
    for column, name in enumerate(("cocostuff171", "cocostuff27", "coco80")):
        assert remap_label(name, raw).tolist() == [v[column] for v in COCO_EXPECTED.values()], name
    fine, coarse = label_maps.TABLES["cocostuff171"], label_maps.TABLES["cocostuff27"]
    assert fine.class_names[0] == "person" and fine.class_names[80] == "banner" and fine.class_names[170] == "wood"
    assert coarse.class_names[9] == "person" and coarse.class_names[23] == "sky"
    # every fine class lands in exactly one coarse class; things (0-79) in 0-11, stuff (80-170) in 12-26
    used = fine.lut != IGNORE
    assert (used == (coarse.lut != IGNORE)).all() and used.sum() == 171
    assert set(coarse.lut[used][fine.lut[used] < 80]) == set(range(12))
    assert set(coarse.lut[used][fine.lut[used] >= 80]) == set(range(12, 27))


def test_other_tables_by_hand():
    raw = np.array(list(CITYSCAPES_EXPECTED), np.uint8)
    assert remap_label("cityscapes27", raw).tolist() == list(CITYSCAPES_EXPECTED.values())
    raw = np.array(list(LIP_EXPECTED), np.uint8)
    for column, name in enumerate(("lip19", "lip16", "lip5")):
        assert remap_label(name, raw).tolist() == [v[column] for v in LIP_EXPECTED.values()], name
    assert remap_label("voc", np.array([0, 1, 20, 21, 255], np.uint8)).tolist() == [0, 1, 20, IGNORE, IGNORE]
    assert remap_label("synthetic", np.array([3, 9], np.uint8)).tolist() == [3, 9]  # identity


def test_table_selection_by_config():
    assert label_maps.for_config(cfg_for("/x", "cocostuff27")).name == "cocostuff27"
    assert label_maps.for_config(cfg_for("/x", "cocostuff171")).name == "cocostuff171"
    assert label_maps.for_config(cfg_for("/x", "coco80")).name == "coco80"
    assert [label_maps.for_config(cfg_for("/x", f"lip{k}")).n_classes for k in (5, 16, 19)] == [6, 17, 20]
    assert label_maps.for_config(cfg_for("/x", "cityscapes27")).n_classes == 27
    assert label_maps.for_config(load_config()) is None  # synthetic labels are class ids
    cfg = cfg_for("/x", "cocostuff27", "data.n_classes=30")
    assert remap_label(cfg_for("/x", "cocostuff27"), np.array([0, 91], np.uint8)).tolist() == [9, 17]
    with pytest.raises(LabelMapError, match="data.n_classes = 30 does not fit data.layout 'cocostuff'.*27"):
        label_maps.for_config(cfg)
    with pytest.raises(LabelMapError, match="data.n_classes = 30"):
        list_samples(cfg, "val")  # checked before anything is listed


# ----------------------------------------------------------------------------------------------- layouts


def make_cocostuff(root: Path) -> None:
    """3 train + 3 val images; val 000000000285 has no instance annotation (dropped by the instances JSON)."""
    for split, ids in (("train2017", (9, 25, 30)), ("val2017", (139, 285, 632))):
        for i in ids:
            write_image(root / "images" / split / f"{i:012d}.jpg", i)
            write_label(root / "annotations" / split / f"{i:012d}.png", list(COCO_EXPECTED))
    instances = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (139, 285, 632)],
        "annotations": [{"id": 1, "image_id": 139, "category_id": 1}, {"id": 2, "image_id": 632, "category_id": 62}],
        "categories": [{"id": 1, "name": "person"}, {"id": 62, "name": "chair"}],
    }
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(instances))


def make_voc(root: Path) -> None:
    ids = {"train": ("2007_000032", "2007_000039"), "val": ("2007_000033", "2007_000042")}
    for split, names in ids.items():
        for k, name in enumerate(names):
            write_image(root / "JPEGImages" / f"{name}.jpg", k)
            write_label(root / "SegmentationClass" / f"{name}.png", [0, 1, 15, 20, 255], palette=True)
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    write_image(root / "JPEGImages" / "2008_000001.jpg", 9)  # detection-only image: in no segmentation list


def make_cityscapes(root: Path) -> None:
    for split, cities in (("train", ("aachen", "bochum")), ("val", ("frankfurt", "lindau"))):
        for k, city in enumerate(cities):
            stem = f"{city}_000000_0000{k}9"
            write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", k)
            write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", list(CITYSCAPES_EXPECTED))
            write_label(root / "gtFine" / split / city / f"{stem}_gtFine_color.png", [1, 2])  # decoys
            write_label(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", [3])


def make_lip(root: Path) -> None:
    for split, ids in (("train", ("77_471474", "100034_483681")), ("val", ("10005_205677", "10009_224283"))):
        for k, i in enumerate(ids):
            write_image(root / f"{split}_images" / f"{i}.jpg", k)
            write_label(root / f"{split}_segmentations" / f"{i}.png", list(LIP_EXPECTED))
        (root / f"{split}_id.txt").write_text("\n".join(ids) + "\n")


def check_labels(samples, table: str, expected: list[int]) -> None:
    for s in samples:
        got = remap_label(table, read_label(s.label))
        assert got.reshape(-1)[: len(expected)].tolist() == expected, s


def test_cocostuff_reader(tmp_path):
    make_cocostuff(tmp_path)
    train = list_samples(cfg_for(tmp_path, "cocostuff27"), "train")
    assert [s.image_id for s in train] == ["000000000009", "000000000025", "000000000030"]
    assert train[0].image.endswith("images/train2017/000000000009.jpg")
    assert train[0].label.endswith("annotations/train2017/000000000009.png")
    val = list_samples(cfg_for(tmp_path, "cocostuff27"), "val")
    assert [s.image_id for s in val] == ["000000000139", "000000000632"]  # 285 has no instance annotation
    for preset, column in (("cocostuff171", 0), ("cocostuff27", 1), ("coco80", 2)):
        check_labels(val, preset, [v[column] for v in COCO_EXPECTED.values()])


def test_curated_split_list(tmp_path, caplog):
    make_cocostuff(tmp_path)
    (tmp_path / "curated_train.txt").write_text("000000000025.jpg\n000000000030\n000000999999\n")
    cfg = cfg_for(tmp_path, "cocostuff27", f"data.train_list={tmp_path / 'curated_train.txt'}")
    assert [s.image_id for s in list_samples(cfg, "train")] == ["000000000025", "000000000030"]
    assert "1 of its 3 ids are not" in caplog.text and "000000999999" in caplog.text
    assert len(list_samples(cfg, "val")) == 2  # val_list unset: the val split is whole
    (tmp_path / "wrong.txt").write_text("nope\n")
    with pytest.raises(DatasetLayoutError, match="wrong.txt: none of its 1 ids"):
        list_samples(cfg_for(tmp_path, "cocostuff27", f"data.val_list={tmp_path / 'wrong.txt'}"), "val")


def test_curated_preset_reads_the_lists_under_the_data_root(tmp_path):
    make_cocostuff(tmp_path)
    with pytest.raises(DatasetLayoutError, match="curated_val.txt: missing .*nothing is downloaded"):
        list_samples(cfg_for(tmp_path, "cocostuff27_curated"), "val")
    (tmp_path / "curated_val.txt").write_text("000000000139\n")
    assert [s.image_id for s in list_samples(cfg_for(tmp_path, "cocostuff27_curated"), "val")] == ["000000000139"]


def test_cocostuff_layout_errors(tmp_path):
    cfg = cfg_for(tmp_path, "cocostuff27")
    with pytest.raises(DatasetLayoutError, match=r"images/train2017: missing the COCO train2017 images"):
        list_samples(cfg, "train")
    make_cocostuff(tmp_path)
    (tmp_path / "annotations" / "train2017" / "000000000025.png").unlink()
    with pytest.raises(
        DatasetLayoutError,
        match=r"annotations/train2017: missing the stuffthingmaps label PNG of "
        r"1 of 3 images \(e\.g\. 000000000025\)",
    ):
        list_samples(cfg, "train")
    for p in (tmp_path / "annotations" / "train2017").iterdir():
        p.unlink()
    (tmp_path / "annotations" / "train2017").rmdir()
    with pytest.raises(
        DatasetLayoutError,
        match=r"annotations/train2017: missing the COCO-Stuff train2017 label "
        r"PNGs.*stuffthingmaps_trainval2017",
    ):
        list_samples(cfg, "train")


def test_voc_reader(tmp_path):
    make_voc(tmp_path)
    cfg = cfg_for(tmp_path, "voc")
    train, val = list_samples(cfg, "train"), list_samples(cfg, "val")
    assert [s.image_id for s in train] == ["2007_000032", "2007_000039"]
    assert [s.image_id for s in val] == ["2007_000033", "2007_000042"]
    assert read_label(val[0].label).reshape(-1)[:5].tolist() == [0, 1, 15, 20, 255]  # palette indices kept
    check_labels(val, "voc", [0, 1, 15, 20, IGNORE])
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2007_999999\n")
    with pytest.raises(
        DatasetLayoutError,
        match=r"JPEGImages: missing 1 of the 2 images listed in .*val.txt "
        r"\(e\.g\. 2007_999999\)",
    ):
        list_samples(cfg, "val")
    with pytest.raises(
        DatasetLayoutError,
        match=r"ImageSets/Segmentation/trainval.txt: missing the VOC 2012 "
        r"'trainval' image list",
    ):
        list_samples(cfg, "trainval")


def test_cityscapes_reader(tmp_path):
    make_cityscapes(tmp_path)
    cfg = cfg_for(tmp_path, "cityscapes27")
    val = list_samples(cfg, "val")
    assert [s.image_id for s in val] == ["frankfurt_000000_000009", "lindau_000000_000019"]
    assert val[1].label.endswith("gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png")
    check_labels(val, "cityscapes27", list(CITYSCAPES_EXPECTED.values()))
    for p in (tmp_path / "gtFine" / "train" / "bochum").glob("*labelIds.png"):
        p.unlink()
    with pytest.raises(
        DatasetLayoutError,
        match=r"gtFine/train: missing the \*_gtFine_labelIds.png of 1 of 2 "
        r"images \(e\.g\. bochum_000000_000019\)",
    ):
        list_samples(cfg, "train")
    with pytest.raises(DatasetLayoutError, match=r"leftImg8bit/test: missing the Cityscapes test images"):
        list_samples(cfg, "test")


def test_lip_reader(tmp_path):
    make_lip(tmp_path)
    train = list_samples(cfg_for(tmp_path, "lip16"), "train")
    assert [s.image_id for s in train] == ["100034_483681", "77_471474"]
    for preset, column in (("lip19", 0), ("lip16", 1), ("lip5", 2)):
        check_labels(train, preset, [v[column] for v in LIP_EXPECTED.values()])
    (tmp_path / "val_id.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"val_id.txt: missing the LIP val id list"):
        list_samples(cfg_for(tmp_path, "lip5"), "val")


def test_folder_reader(tmp_path):
    write_image(tmp_path / "a.jpg", 0)
    write_image(tmp_path / "sub" / "b.png", 1)
    (tmp_path / "notes.txt").write_text("not an image")
    cfg = load_config(overrides=["data.layout=folder", f"data.root={tmp_path}"])
    samples = list_samples(cfg, "train")
    assert [(s.image_id, s.label) for s in samples] == [("a", None), ("sub__b", None)]
    with pytest.raises(DatasetLayoutError, match="no labels, so no 'val' split"):
        list_samples(cfg, "val")
    with pytest.raises(DatasetLayoutError, match="missing a folder of images"):
        list_samples(load_config(overrides=["data.layout=folder", f"data.root={tmp_path / 'none'}"]), "train")


def test_readers_on_s3(s3_bucket, tmp_path):
    """The same fixtures staged to the moto server with jobs/stage_dataset.py read the same from s3://."""
    stage = stage_module()
    for name, make, preset, split in (
        ("coco", make_cocostuff, "cocostuff171", "val"),
        ("city", make_cityscapes, "cityscapes27", "train"),
        ("lip", make_lip, "lip5", "val"),
        ("voc", make_voc, "voc", "train"),
    ):
        local = tmp_path / name
        make(local)
        stage.stage_dataset(local, f"{s3_bucket}/{name}", workers=4, progress=False)
        remote = list_samples(cfg_for(f"{s3_bucket}/{name}", preset), split)
        here = list_samples(cfg_for(local, preset), split)
        assert [s.image_id for s in remote] == [s.image_id for s in here] and remote, name
        assert remote[0].image.startswith(f"{s3_bucket}/{name}/") and remote[0].label.startswith(f"{s3_bucket}/")
        for r, h in zip(remote, here):
            assert (remap_label(preset, read_label(r.label)) == remap_label(preset, read_label(h.label))).all()
    with pytest.raises(DatasetLayoutError, match=rf"{s3_bucket}/nothing/images/val2017: missing the COCO val2017"):
        list_samples(cfg_for(f"{s3_bucket}/nothing", "cocostuff27"), "val")


def test_missing_bucket_root(s3_bucket):
    cfg = cfg_for("s3://no-such-bucket-transfgu/coco", "cocostuff27")
    with pytest.raises(
        StorageError,
        match=r"s3://no-such-bucket-transfgu/coco/images/val2017: bucket "
        r"'no-such-bucket-transfgu' does not exist \(endpoint http://127",
    ):
        list_samples(cfg, "val")


def test_evaluation_labels_are_remapped(tmp_path):
    """The evaluate stage scores remapped labels: COCO raw ids -> the 27 super-classes, 255 ignored."""
    from transfgu_dist.pipeline.scoring import load_labeled_images

    make_cocostuff(tmp_path)
    cfg = cfg_for(tmp_path, "cocostuff27")
    val = list_samples(cfg, "val")
    batch = {
        "image_id": np.array([s.image_id for s in val]),
        "uri": np.array([s.image for s in val]),
        "label": np.array([s.label for s in val]),
    }
    out = load_labeled_images(batch, (H, W), label_map=label_maps.table_name(cfg.data.layout, cfg.data.n_classes))
    assert out["ok"].all()
    expected = [v[1] for v in COCO_EXPECTED.values()]
    assert out["gt"][0].reshape(-1)[: len(expected)].tolist() == expected
