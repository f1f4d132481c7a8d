"""Seeded procedural segmentation scenes for demos and tests.

A scene is 2-3 textured background (stuff) bands with wavy boundaries, stacked in a fixed
top-to-bottom order, plus 1-3 textured objects (things) pasted on top, later ones occluding
earlier ones. Class ids put the THINGS FIRST (``0 .. N_THING-1``) and the stuff classes after,
like the authors' COCO-Stuff-27 ordering.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

THING_NAMES = ("red_disk", "blue_square", "purple_triangle", "yellow_ellipse")
STUFF_NAMES = ("sky", "wall", "grass", "sand")  # also the top-to-bottom band order
CLASS_NAMES: tuple[str, ...] = THING_NAMES + STUFF_NAMES
N_THING = len(THING_NAMES)
N_STUFF = len(STUFF_NAMES)
SCENES_PER_SEED = 1_000_000  # write_dataset(seed=s) scene i is make_scene(s * SCENES_PER_SEED + i)

Rng = np.random.Generator


def _smooth_noise(rng: Rng, h: int, w: int, cell_y: float, cell_x: float) -> np.ndarray:
    """Bilinearly interpolated value noise in [0, 1] with feature size ``cell_y x cell_x`` px."""
    grid = rng.random((int(h / cell_y) + 2, int(w / cell_x) + 2), dtype=np.float32)
    y, x = np.arange(h, dtype=np.float32) / cell_y, np.arange(w, dtype=np.float32) / cell_x
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _tint(base: tuple[int, int, int], shade: np.ndarray) -> np.ndarray:
    """Colour ``base`` modulated by a per-pixel brightness factor ``shade`` -> [H, W, 3]."""
    return np.asarray(base, dtype=np.float32) * shade[..., None].astype(np.float32, copy=False)


def _sky(rng: Rng, h: int, w: int) -> np.ndarray:
    t = np.linspace(0, 1, h)[:, None, None]
    gradient = (1 - t) * np.array([60, 120, 215]) + t * np.array([185, 215, 245])
    clouds = np.clip(_smooth_noise(rng, h, w, 12, 24) * 2 - 1.1, 0, 1)[..., None]
    return np.broadcast_to(gradient, (h, w, 3)) * (1 - clouds) + 250 * clouds


def _wall(rng: Rng, h: int, w: int) -> np.ndarray:
    bh, bw = 10, 20
    yy, xx = np.mgrid[0:h, 0:w]
    row = yy // bh
    col = (xx + (row % 2) * (bw // 2)) // bw
    brick_shade = 0.8 + 0.35 * rng.random((row.max() + 1, col.max() + 1))[row, col]
    mortar = (yy % bh < 2) | ((xx + (row % 2) * (bw // 2)) % bw < 2)
    img = _tint((150, 70, 45), brick_shade)
    img[mortar] = (175, 170, 160)
    return img


def _grass(rng: Rng, h: int, w: int) -> np.ndarray:
    blades = _smooth_noise(rng, h, w, 10, 1.5)
    return _tint((55, 140, 45), 0.6 + 0.7 * blades)


def _sand(rng: Rng, h: int, w: int) -> np.ndarray:
    dunes = _smooth_noise(rng, h, w, 6, 30)
    return _tint((215, 190, 135), 0.85 + 0.2 * dunes)


STUFF_TEXTURES = (_sky, _wall, _grass, _sand)


def _disk(yy: np.ndarray, xx: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    d2 = (yy**2 + xx**2) / r**2
    return d2 <= 1, _tint((220, 35, 35), 1.1 - 0.45 * np.clip(d2, 0, 1))


def _square(yy: np.ndarray, xx: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    checker = ((yy // 6 + xx // 6) % 2).astype(np.float32)
    return (np.abs(yy) <= r * 0.85) & (np.abs(xx) <= r * 0.85), _tint((40, 75, 205), 0.75 + 0.4 * checker)


def _triangle(yy: np.ndarray, xx: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    # upward triangle: base at y = +r/2, apex at y = -r, half-width grows linearly to r at the base
    inside = (yy <= r / 2) & (np.abs(xx) <= (yy + r) / 1.5)
    return inside, _tint((150, 50, 190), 0.8 + 0.3 * (yy + r) / (1.5 * r))


def _ellipse(yy: np.ndarray, xx: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    stripes = ((xx + yy) // 5 % 2).astype(np.float32)
    return (yy / (0.6 * r)) ** 2 + (xx / r) ** 2 <= 1, _tint((240, 210, 40), 1.0 - 0.35 * stripes)


THING_SHAPES = (_disk, _square, _triangle, _ellipse)


def make_scene(seed: int, size: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic scene for ``seed``: image uint8 ``[H, W, 3]``, label uint8 ``[H, W]``.

    Label ids index ``CLASS_NAMES`` (things first). Objects have radius 10-22% of the short
    side, i.e. several 8-px patches across at 96-160 px.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]

    stuff = np.sort(rng.choice(N_STUFF, size=rng.integers(2, 4), replace=False))
    base = np.sort(rng.uniform(0.2, 0.8, len(stuff) - 1)) * h
    amp = rng.uniform(2, 0.06 * h, (len(stuff) - 1, 1))
    freq = rng.uniform(0.5, 3, (len(stuff) - 1, 1)) * 2 * np.pi / w
    phase = rng.uniform(0, 2 * np.pi, (len(stuff) - 1, 1))
    boundaries = base[:, None] + amp * np.sin(freq * np.arange(w) + phase)  # [bands-1, W]
    band = (yy[None] >= boundaries[:, None, :]).sum(0)
    label = (N_THING + stuff[band]).astype(np.uint8)
    image = np.zeros((h, w, 3), dtype=np.float32)
    for i, s in enumerate(stuff):
        mask = band == i
        image[mask] = STUFF_TEXTURES[s](rng, h, w)[mask]

    short = min(h, w)
    for thing in rng.integers(0, N_THING, size=rng.integers(1, 4)):
        r = rng.uniform(0.10, 0.22) * short
        cy, cx = rng.uniform(r * 0.5, h - r * 0.5), rng.uniform(r * 0.5, w - r * 0.5)
        box = np.s_[max(int(cy - r), 0) : int(cy + r) + 2, max(int(cx - r), 0) : int(cx + r) + 2]
        mask, texture = THING_SHAPES[thing](yy[box] - cy, xx[box] - cx, r)
        image[box][mask] = texture[mask]
        label[box][mask] = thing

    image += rng.random(image.shape, dtype=np.float32) * 12 - 6  # sensor-like grain
    return np.clip(image, 0, 255).round().astype(np.uint8), label


def write_dataset(
    root: str | Path, n_train: int, n_val: int, size: tuple[int, int] = (128, 128), seed: int = 0
) -> None:
    """Write ``root/{images,labels}/{train,val}/<id>.png`` and ``root/classes.txt``.

    Ids are zero-padded global indices ``i`` (val ids continue after train, so ids never repeat
    across splits) and scene ``i`` is ``make_scene(seed * SCENES_PER_SEED + i, size)``.
    """
    if n_train + n_val > SCENES_PER_SEED:
        raise ValueError(f"at most {SCENES_PER_SEED} scenes per dataset seed")
    root = Path(root)
    splits = [("train", i) for i in range(n_train)] + [("val", n_train + i) for i in range(n_val)]
    for split in ("train", "val"):
        for kind in ("images", "labels"):
            (root / kind / split).mkdir(parents=True, exist_ok=True)
    for split, i in splits:
        image, label = make_scene(seed * SCENES_PER_SEED + i, size)
        name = f"{i:06d}.png"
        Image.fromarray(image).save(root / "images" / split / name, compress_level=1)
        Image.fromarray(label).save(root / "labels" / split / name, compress_level=1)
    (root / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
