import numpy as np
from PIL import Image

from transfgu_dist.io.synthetic import CLASS_NAMES, N_STUFF, N_THING, SCENES_PER_SEED, make_scene, write_dataset


def test_class_lists():
    assert N_THING + N_STUFF == len(CLASS_NAMES)
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)


def test_deterministic_per_seed():
    a_img, a_lab = make_scene(7)
    b_img, b_lab = make_scene(7)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, _ = make_scene(8)
    assert not np.array_equal(a_img, c_img)


def test_shapes_dtypes_and_ids():
    for size in [(96, 96), (128, 160)]:
        img, lab = make_scene(3, size)
        assert img.shape == (*size, 3) and img.dtype == np.uint8
        assert lab.shape == size and lab.dtype == np.uint8
        assert lab.max() < len(CLASS_NAMES)


def test_scenes_mix_things_and_stuff():
    seen = set()
    for seed in range(12):
        _, lab = make_scene(seed)
        ids = set(np.unique(lab).tolist())
        assert any(i < N_THING for i in ids), "every scene pastes at least one object"
        assert sum(i >= N_THING for i in ids) >= 2, "at least two background bands"
        seen |= ids
    assert len(seen) >= len(CLASS_NAMES) - 1


def test_write_dataset_layout_and_roundtrip(tmp_path):
    write_dataset(tmp_path, n_train=3, n_val=2, size=(96, 96), seed=1)
    expected = {"train": ["000000", "000001", "000002"], "val": ["000003", "000004"]}
    for split, ids in expected.items():
        for kind in ("images", "labels"):
            assert sorted(p.stem for p in (tmp_path / kind / split).glob("*.png")) == ids
        for i in ids:
            img, lab = make_scene(SCENES_PER_SEED + int(i), (96, 96))
            np.testing.assert_array_equal(np.array(Image.open(tmp_path / "images" / split / f"{i}.png")), img)
            np.testing.assert_array_equal(np.array(Image.open(tmp_path / "labels" / split / f"{i}.png")), lab)
    assert (tmp_path / "classes.txt").read_text().splitlines() == list(CLASS_NAMES)
