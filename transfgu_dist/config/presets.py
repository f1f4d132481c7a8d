"""Dataset presets (one function per preset, applied to the defaults) and the `paper` profile's overrides.

Image sizes a preset leaves None are derived from `pseudo.image_size` (`derive_sizes`): a preset sets only the
base size and the sizes that break the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transfgu_dist.config.schema import Config

# Settings where the authors' code departs from the paper. The dataclass defaults are the `reference` profile.
PROFILES: dict[str, dict[str, Any]] = {
    "reference": {},
    "paper": {
        "pseudo.similarity": "dot",
        "pseudo.response": "paper",
        "pseudo.loss_scale": 1.0,
        "pseudo.split_fg_bg": True,
        "decoder.mask_head": "scaled_dot",
        "loss.alpha_step": 0.0,
        "loss.diversity": "paper",
        "loss.label_norm": "none",
        "crops.window_rule": "paper",
        "decoder.block_eps": 1e-6,
        "decoder.class_init": "trunc_normal",
        "train.best_by": "miou",
        "train.skip_nonpositive_loss": False,
        "train.per_batch_augment": False,
        "train.drop_last": False,
        "data.resize": "antialias",
    },
}


def synthetic(cfg: Config) -> None:
    """Generated scenes of a few shapes at 128 px: cropped at the pseudo-label size, not twice it."""
    cfg.encoder.random_fallback = True
    cfg.pseudo.image_size = (128, 128)
    cfg.crops.image_size = (128, 128)
    cfg.crops.batch_size = 128
    cfg.decoder.n_heads = 2
    cfg.train.lr = 1e-3
    cfg.train.use_gpu = None  # the demo runs on a laptop or a cluster alike: what the cluster has
    cfg.resources.actor_gpus = None
    cfg.resources.cluster_gpu = None


def _coco(cfg: Config, n_classes: int, k_fg: int, k_bg: int) -> None:
    """COCO-Stuff / COCO at 320 px, attention prior, batch 256."""
    cfg.data.layout = "cocostuff"
    cfg.data.n_classes = n_classes
    cfg.cluster.k_fg, cfg.cluster.k_bg = k_fg, k_bg
    cfg.crops.prior = "attention"
    cfg.train.batch_size = 256


def cocostuff27(cfg: Config) -> None:
    """COCO-Stuff-27: 12 things + 15 stuff concepts, a teacher update every 2 epochs for 200 epochs."""
    _coco(cfg, n_classes=27, k_fg=12, k_bg=15)
    cfg.train.round_epochs = (2,) * 100


def cocostuff27_curated(cfg: Config) -> None:
    """COCO-Stuff-27 on the curated splits of PiCIE, STEGO and the authors (the split the field's COCO-27 figures
    are on): `curated_train.txt` and `curated_val.txt` under data.root, supplied by the user (49,629 and 2,175
    ids); the authors' curated settings: lr 2.2e-4, a teacher update every epoch for 200 epochs. The lists here
    restrict every stage's train split (the authors cluster and pseudo-label the full one)."""
    cocostuff27(cfg)
    cfg.data.train_list, cfg.data.val_list = "curated_train.txt", "curated_val.txt"
    cfg.train.lr = 2.2e-4
    cfg.train.round_epochs = (1,) * 200


def cocostuff171(cfg: Config) -> None:
    """COCO-Stuff-171: 80 things + 91 stuff concepts, teacher updates every 3 epochs, then every 2."""
    _coco(cfg, n_classes=171, k_fg=80, k_bg=91)
    cfg.train.round_epochs = (3,) * 10 + (2,) * 85


def coco80(cfg: Config) -> None:
    """COCO-80 things plus a background class: 80 concepts and the background channel."""
    _coco(cfg, n_classes=81, k_fg=80, k_bg=0)
    cfg.loss.background_channel = True
    cfg.train.round_epochs = (3,) * 10 + (2,) * 85


def voc(cfg: Config) -> None:
    """Pascal VOC: 20 object concepts plus the background channel, larger crop scales, 20 passes an epoch."""
    cfg.data.layout = "voc"
    cfg.data.n_classes = 21
    cfg.cluster.k_fg, cfg.cluster.k_bg = 20, 0
    cfg.crops.betas = (0.6, 0.5, 0.4, 0.3)
    cfg.loss.background_channel = True
    cfg.train.batch_size = 512
    cfg.train.epoch_repeat = 20
    cfg.train.round_epochs = (5,) * 8 + (4,) * 12 + (2,) + (3,) * 3 + (1,)


def cityscapes27(cfg: Config) -> None:
    """Cityscapes-27 at 320 x 640: 27 concepts, no foreground prior, a teacher update every epoch."""
    cfg.data.layout = "cityscapes"
    cfg.data.n_classes = 27
    cfg.cluster.k_fg, cfg.cluster.k_bg = 27, 0
    cfg.crops.prior = "none"
    cfg.pseudo.image_size = (320, 640)
    cfg.pseudo.batch_size = 2
    cfg.train.lr = 5e-5
    cfg.train.batch_size = 256
    cfg.train.round_epochs = (1,) * 50
    cfg.train.epoch_repeat = 20


def _lip(cfg: Config, k: int) -> None:
    """LIP person parts at 640 x 320 (portrait): K part concepts plus the background channel, all crops fg."""
    cfg.data.layout = "lip"
    cfg.data.n_classes = k + 1
    cfg.cluster.k_fg, cfg.cluster.k_bg = k, 0
    cfg.crops.prior = "all_fg"
    cfg.pseudo.image_size = (640, 320)
    cfg.pseudo.batch_size = 2
    cfg.eval.image_size = (640, 320)  # the authors evaluate every LIP split at 640 x 320, whatever its training size
    cfg.loss.background_channel = True


def lip5(cfg: Config) -> None:
    """LIP-5: 5 coarse parts, trained at 480 x 240, lr 1e-4, batch 512."""
    _lip(cfg, 5)
    cfg.train.image_size = (480, 240)
    cfg.train.lr = 1e-4
    cfg.train.batch_size = 512
    cfg.train.round_epochs = (2,) * 50


def lip16(cfg: Config) -> None:
    """LIP-16: 16 parts, trained at 480 x 240, lr 2e-5, batch 512."""
    _lip(cfg, 16)
    cfg.train.image_size = (480, 240)
    cfg.train.lr = 2e-5
    cfg.train.batch_size = 512
    cfg.train.round_epochs = (2,) * 50


def lip19(cfg: Config) -> None:
    """LIP-19: all 19 parts at 640 x 320, lr 2e-5, batch 256, teacher updates every 3 epochs, then every 2."""
    _lip(cfg, 19)
    cfg.train.lr = 2e-5
    cfg.train.batch_size = 256
    cfg.train.round_epochs = (3,) * 10 + (2,) * 35


PRESETS: dict[str, Callable[[Config], None]] = {
    p.__name__: p
    for p in (synthetic, cocostuff27, cocostuff27_curated, cocostuff171, coco80, voc, cityscapes27, lip5, lip16, lip19)
}
