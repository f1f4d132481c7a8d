"""Typed configuration: dataclasses, dataset presets, the `paper`/`reference` profiles, YAML and CLI overrides.

Precedence: preset defaults < profile < YAML file < command-line `section.key=value` overrides.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; the message names where."""


# name -> (patch size, width, depth, heads, timm pretrained tag with DINO weights)
ARCHS: dict[str, tuple[int, int, int, int, str | None]] = {
    "vit_small_patch8": (8, 384, 12, 6, "vit_small_patch8_224.dino"),
    "vit_small_patch16": (16, 384, 12, 6, "vit_small_patch16_224.dino"),
    "vit_base_patch8": (8, 768, 12, 12, "vit_base_patch8_224.dino"),
    "vit_base_patch16": (16, 768, 12, 12, "vit_base_patch16_224.dino"),
    "vit_tiny_test": (8, 48, 2, 2, None),  # random weights, for tests and the laptop demo
    "vit_small_patch14_dinov2": (14, 384, 12, 6, "vit_small_patch14_dinov2.lvd142m"),
    "vit_base_patch14_dinov2": (14, 768, 12, 12, "vit_base_patch14_dinov2.lvd142m"),
    "vit_small_patch14_reg4_dinov2": (14, 384, 12, 6, "vit_small_patch14_reg4_dinov2.lvd142m"),
    "vit_base_patch14_reg4_dinov2": (14, 768, 12, 12, "vit_base_patch14_reg4_dinov2.lvd142m"),
    "vit_small_patch16_dinov3": (16, 384, 12, 6, "vit_small_patch16_dinov3.lvd1689m"),
    "vit_base_patch16_dinov3": (16, 768, 12, 12, "vit_base_patch16_dinov3.lvd1689m"),
    # tiny random members of each newer family: the real timm model class and code path, reduced width/depth
    "dinov2_tiny_test": (14, 48, 2, 2, None),
    "dinov2_reg4_tiny_test": (14, 48, 2, 2, None),
    "dinov3_tiny_test": (16, 48, 2, 2, None),
}


@dataclass
class DataConfig:
    """Where the images live and how their labels read (labels only used for evaluation)."""

    layout: str = "synthetic"  # synthetic | folder | cocostuff | voc | cityscapes | lip
    root: str = ""  # local path or s3:// URI; "" = generate synthetic scenes under the output
    train_split: str = "train"
    val_split: str = "val"
    n_classes: int = 8  # ground-truth classes scored at evaluation
    limit: int | None = None  # use only the first N images of each split (smoke runs)
    train_list: str | None = None  # file of image ids (one a line) restricting the train split, e.g. the
    val_list: str | None = None  # curated COCO lists; local or s3:// (None: the whole split)
    synthetic_train: int = 48
    synthetic_val: int = 16
    synthetic_size: int = 128
    resize: str = "reference"  # reference: nearest (COCO full images) / plain bilinear, labels `nearest` |
    # antialias: antialiased bilinear, RoI-Align crops (transfgu_dist.method.resizing)


@dataclass
class EncoderConfig:
    """Frozen DINO ViT (paper sec 3.1, 4.2)."""

    arch: str = (
        "vit_small_patch8"  # DINO v1 vit_{small,base}_patch{8,16}, DINOv2 vit_{small,base}_patch14[_reg4]_dinov2,
    )
    # DINOv3 vit_{small,base}_patch16_dinov3 (encoder.ARCHS), or a *_tiny_test
    weights: str = "timm"  # "timm" (timm's DINO/DINOv2/DINOv3 weights), an official .pth path or s3:// URI, or "random"
    random_fallback: bool = False  # demo only: fall back to random weights (loudly) when none can be loaded


@dataclass
class CropConfig:
    """Sliding-window crops with the foreground prior (sec 3.2, 4.2)."""

    betas: tuple[float, ...] = (0.5, 0.4, 0.3, 0.2)
    image_size: tuple[int, int] = (640, 640)  # full image resized to this before cropping
    crop_size: int = 320  # every crop resized to this square (paper: min(H,W)/2)
    prior: str = "attention"  # attention | none (Cityscapes) | all_fg (LIP)
    fg_min: float = 0.5
    bg_min: float = 0.8
    feature_dtype: str = "float32"  # stored CLS features: float32 (reference) | float16 (half the size)
    window_rule: str = "reference"  # reference: (b+1)-token windows, (b+1)*p-1 px | paper: b tokens
    batch_size: int = 64  # crops per encoder batch
    images_per_task: int = 4  # images per Ray Data read/decode task
    # images per Parquet part (one actor call): ~100 kept crops x ~0.8 KB (384 fp16 + box) = ~80 KB an image at
    # 640 px, so 256 images make a ~20 MB part and COCO's 117k images ~460 parts (docs/performance.md)
    images_per_part: int = 256


@dataclass
class ClusterConfig:
    """K-means of crop CLS features into K = k_fg + k_bg concepts (sec 3.2)."""

    k_fg: int = 4
    k_bg: int = 4
    niter: int = 100
    seed: int = 1
    # None: every point; N: a uniform sample of N points per centroid, and only those are kept in memory
    max_points_per_centroid: int | None = None


@dataclass
class PseudoLabelConfig:
    """Grad-CAM pseudo labels (Eqs 5-8)."""

    image_size: tuple[int, int] = (320, 320)
    similarity: str = "cosine"  # dot: x S^T / sqrt(d) (Eq. 5) | cosine (reference)
    response: str = (
        "reference"  # paper: M = dSim/dA + A (Eq. 7) | reference: max-normalised A + top-mass rectified gradient
    )
    loss_scale: float | None = None  # Grad-CAM loss factor; None: 1/len(batch) for every batch, a final partial
    # one too (reference: batch-mean loss) | paper: 1.0
    top_mass: float = 0.8  # reference: keep the gradient on its top 80% mass
    split_fg_bg: bool = False  # paper sec 4.2: fg pixels get no bg concepts and vice versa
    batch_size: int = 8  # images per Grad-CAM batch
    images_per_part: int = 256  # images per bank part: 27 x 40 x 40 maps = 93 KB an image, ~24 MB a part


@dataclass
class DecoderConfig:
    """Segmenter mask transformer (Eq. 2)."""

    n_layers: int = 2
    n_heads: int = 6
    dropout: float = 0.1
    mask_head: str = "cosine_ln"  # scaled_dot: x'C^T/sqrt(d) (Eq. 2) | cosine_ln (reference)
    block_eps: float = 1e-5  # LayerNorm eps in the blocks: reference 1e-5 | timm's Block default 1e-6
    class_init: str = "orthogonal"  # orthogonal: (1, K, d) orthogonal_, each row norm ~1/sqrt(K) (reference)
    # | trunc_normal: std 0.02


@dataclass
class LossConfig:
    """Bootstrapping losses (Eqs 9-16)."""

    alpha: float = 0.03  # peer-loss weight (Eq. 13); with alpha_step the start of a schedule
    alpha_step: float = 0.01  # reference: alpha += step per epoch since the last teacher update
    alpha_max: float = 0.10
    omega1: float = 1.0  # diversity (Eq. 16)
    omega2: float = 0.3  # uncertainty (Eq. 16)
    t_bg: float = 0.1  # background threshold (Eq. 8)
    background_channel: bool = False  # things-only presets: prepend ReLU(T_bg - max_k M_k) as channel 0
    diversity: str = "reference"  # paper: 1 + mean(CC^T)/sqrt(d) | reference: mean over pairs of 1 + cos
    label_norm: str = "minmax"  # none | minmax (reference: per-crop min-max of the pseudo label)


@dataclass
class TrainConfig:
    """Teacher-student bootstrapping on Ray Train (sec 3.3)."""

    round_epochs: tuple[int, ...] = (2, 2, 2)  # epochs of round 0 (plain CE on M), 1 (teacher = round 0), ...
    batch_size: int = 16  # per worker
    lr: float = 1e-4
    weight_decay: float = 5e-4
    grad_clip: float = 1.0  # gradient value clamp
    reset_optimizer: bool = False  # reference keeps the Adam state across student resets
    image_size: tuple[int, int] = (320, 320)  # training input before the random crop (crop is resized to half)
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    max_failures: int = 2
    data_fraction: float = 1.0  # train on a random fraction of the bank (sweeps)
    epoch_repeat: int = 1  # passes over the training set per epoch (reference VOC/Cityscapes: 20)
    eval_every: int = 1  # val mIoU every N epochs on rank 0 (0: never)
    seed: int = 2021
    per_batch_augment: bool = False  # reference: one photometric draw per batch
    best_by: str = "miou_plus_acc"  # best.pt maximises: miou_plus_acc (reference) | miou
    skip_nonpositive_loss: bool = True  # reference: no optimizer step when the total loss is <= 0


@dataclass
class EvalConfig:
    image_size: tuple[int, int] = (320, 320)
    batch_size: int = 16
    n_overlays: int = 8
    checkpoint: str = ""  # "" = bootstrap/final.pt (last epoch), "best" = bootstrap/best.pt (best
    # epoch on val, the reference protocol's pick), or a checkpoint URI
    crf: bool = False  # dense-CRF refinement before scoring (crf.py; the paper reports without)


@dataclass
class Config:
    preset: str = "synthetic"
    profile: str = "reference"  # reference | paper
    output: str = "outputs/synthetic"  # local path or s3:// URI
    source: str = ""  # an earlier run's output whose data, features, concepts and bank to reuse
    mlflow_uri: str = ""  # MLflow tracking URI; "" = MLFLOW_TRACKING_URI or sqlite under the output
    experiment: str = "transfgu-dist"  # MLflow experiment name
    mlflow_artifacts: str = ""  # artifact root of an experiment this run creates (local or s3://); "" =
    # <output>/mlflow-artifacts on s3://, else beside a SQLite store
    seed: int = 2021
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def inputs_root(self) -> str:
        """Where the data and the label-free stages' outputs live: `source` when reused, else `output`."""
        return self.source or self.output

    @property
    def data_root(self) -> str:
        """The dataset root: `data.root`, else the synthetic scenes' folder `<inputs root>/data`."""
        return self.data.root or self.inputs_root.rstrip("/") + "/data"

    @property
    def n_concepts(self) -> int:
        return self.cluster.k_fg + self.cluster.k_bg

    @property
    def n_outputs(self) -> int:
        """Decoder channels: K concepts, plus the background channel of things-only presets."""
        return self.n_concepts + int(self.loss.background_channel)


# Settings where the authors' code departs from the paper (reference doc sec 11). `reference` is the default.
PROFILES: dict[str, dict[str, Any]] = {
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
        "data.resize": "antialias",
    },
    "reference": {
        "pseudo.similarity": "cosine",
        "pseudo.response": "reference",
        "pseudo.loss_scale": None,
        "pseudo.split_fg_bg": False,
        "decoder.mask_head": "cosine_ln",
        "loss.alpha_step": 0.01,
        "loss.diversity": "reference",
        "loss.label_norm": "minmax",
        "crops.window_rule": "reference",
        "decoder.block_eps": 1e-5,
        "decoder.class_init": "orthogonal",
        "train.best_by": "miou_plus_acc",
        "train.skip_nonpositive_loss": True,
        "train.per_batch_augment": True,
        "data.resize": "reference",
    },
}

_COCO = {
    "data.layout": "cocostuff",
    "crops.prior": "attention",
    "train.batch_size": 256,
    "train.round_epochs": (2,) * 100,
}
PRESETS: dict[str, dict[str, Any]] = {
    "synthetic": {
        "encoder.random_fallback": True,
        "crops.image_size": (128, 128),
        "crops.crop_size": 64,
        "crops.batch_size": 128,
        "pseudo.image_size": (128, 128),
        "train.image_size": (128, 128),
        "eval.image_size": (128, 128),
        "decoder.n_heads": 2,
        "train.batch_size": 16,
        "train.lr": 1e-3,
    },
    "cocostuff27": {**_COCO, "data.n_classes": 27, "cluster.k_fg": 12, "cluster.k_bg": 15},
    "cocostuff171": {
        **_COCO,
        "data.n_classes": 171,
        "cluster.k_fg": 80,
        "cluster.k_bg": 91,
        "train.round_epochs": (3,) * 10 + (2,) * 85,
    },
    "coco80": {
        **_COCO,
        "data.n_classes": 81,
        "cluster.k_fg": 80,
        "cluster.k_bg": 0,
        "loss.background_channel": True,
        "train.round_epochs": (3,) * 10 + (2,) * 85,
    },
    "voc": {
        "data.layout": "voc",
        "data.n_classes": 21,
        "cluster.k_fg": 20,
        "cluster.k_bg": 0,
        "crops.betas": (0.6, 0.5, 0.4, 0.3),
        "loss.background_channel": True,
        "train.batch_size": 512,
        "train.epoch_repeat": 20,
        "train.round_epochs": (5,) * 8 + (4,) * 12 + (2,) + (3,) * 3 + (1,),
    },
    "cityscapes27": {
        "data.layout": "cityscapes",
        "data.n_classes": 27,
        "cluster.k_fg": 27,
        "cluster.k_bg": 0,
        "crops.prior": "none",
        "crops.image_size": (640, 1280),
        "pseudo.image_size": (320, 640),
        "train.image_size": (320, 640),
        "eval.image_size": (320, 640),
        "pseudo.batch_size": 2,
        "train.lr": 5e-5,
        "train.batch_size": 256,
        "train.round_epochs": (1,) * 50,
        "train.epoch_repeat": 20,
    },
    **{
        f"lip{k}": {
            "data.layout": "lip",
            "data.n_classes": k + 1,
            "cluster.k_fg": k,
            "cluster.k_bg": 0,
            "crops.prior": "all_fg",
            "crops.image_size": (1280, 640),
            "pseudo.image_size": (640, 320),
            "train.image_size": (480, 240) if k < 19 else (640, 320),
            "eval.image_size": (480, 240) if k < 19 else (640, 320),
            "loss.background_channel": True,
            "pseudo.batch_size": 2,
            "train.lr": 1e-4 if k == 5 else 2e-5,
            "train.batch_size": 512 if k < 19 else 256,
            "train.round_epochs": (2,) * 50 if k < 19 else (3,) * 10 + (2,) * 35,
        }
        for k in (5, 16, 19)
    },
}


class _Loader(yaml.SafeLoader):
    """YAML with floats in any notation: `1e-4`, `2E3`, `1.0e-4` (YAML 1.1 wants a dot and a signed exponent)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML text; a syntax error names `where` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{where}: not valid YAML ({problem}{at})") from e


def _parse_scalar(text: str) -> Any:
    return load_yaml(text, f"command line value '{text}'")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert `value` to the annotated type `tp` (str annotations resolved by the caller)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(v, item, where) for v in value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if tp in (int, str, bool) and not (isinstance(value, tp) and (tp is bool or not isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def set_key(cfg: Config, dotted: str, value: Any, where: str) -> None:
    """Set `section.key` to `value`, type-checked; errors name `where` (a file, the command line, ...)."""
    target = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not is_dataclass(target) or p not in {f.name for f in fields(target)}:
            raise ConfigError(f"{where}: unknown section '{p}' in key '{dotted}'")
        target = getattr(target, p)
    hints = typing.get_type_hints(type(target))
    key = parts[-1]
    if not is_dataclass(target) or key not in hints or is_dataclass(hints[key]):
        known = ", ".join(sorted(f.name for f in fields(target))) if is_dataclass(target) else ""
        raise ConfigError(f"{where}: unknown key '{dotted}' (known keys here: {known})")
    setattr(target, key, _coerce(value, hints[key], f"{where}: key '{dotted}'"))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    preset: str | None = None,
    profile: str | None = None,
) -> Config:
    """Build a Config: preset < profile < YAML file < `key=value` overrides. The file may name `preset`/`profile`."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (expected a YAML file of config sections)")
        tree = load_yaml(p.read_text(), str(p)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: expected a mapping of config sections at the top level")
    cli: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected section.key=value")
        key, text = item.split("=", 1)
        cli[key.strip()] = _parse_scalar(text)
    preset = cli.pop("preset", None) or preset or tree.pop("preset", None) or "synthetic"
    profile = cli.pop("profile", None) or profile or tree.pop("profile", None) or "reference"
    tree.pop("preset", None), tree.pop("profile", None)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}' (known: {', '.join(PROFILES)})")
    cfg = Config(preset=preset, profile=profile, output=f"outputs/{preset}")
    for where, values in (
        (f"preset {preset}", PRESETS[preset]),
        (f"profile {profile}", PROFILES[profile]),
        (str(path), _flatten(tree)),
        ("command line", cli),
    ):
        for key, value in values.items():
            set_key(cfg, key, value, where)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks with messages that name the key."""
    choices = {
        "crops.prior": ("attention", "none", "all_fg"),
        "pseudo.similarity": ("dot", "cosine"),
        "pseudo.response": ("paper", "reference"),
        "decoder.mask_head": ("scaled_dot", "cosine_ln"),
        "loss.diversity": ("paper", "reference"),
        "loss.label_norm": ("none", "minmax"),
        "crops.window_rule": ("reference", "paper"),
        "decoder.class_init": ("orthogonal", "trunc_normal"),
        "train.best_by": ("miou_plus_acc", "miou"),
        "crops.feature_dtype": ("float32", "float16"),
        "data.resize": ("reference", "antialias"),
    }
    for key, allowed in choices.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"key '{key}' = {value!r}: expected one of {', '.join(allowed)}")
    if cfg.cluster.k_fg < 1 or cfg.cluster.k_bg < 0:
        raise ConfigError("keys 'cluster.k_fg' >= 1 and 'cluster.k_bg' >= 0 are required")
    if cfg.cluster.k_bg > 0 and cfg.crops.prior != "attention":
        raise ConfigError(
            f"key 'cluster.k_bg' = {cfg.cluster.k_bg} needs crops.prior = attention "
            f"(prior '{cfg.crops.prior}' yields no background crops)"
        )
    if not cfg.train.round_epochs or min(cfg.train.round_epochs) < 1:
        raise ConfigError("key 'train.round_epochs' must list at least one round of >= 1 epoch")
    if cfg.train.epoch_repeat < 1:
        raise ConfigError(f"key 'train.epoch_repeat' = {cfg.train.epoch_repeat}: expected an integer >= 1")
    _check_patch_sizes(cfg)


def _check_patch_sizes(cfg: Config) -> None:
    """Every size the encoder sees is a multiple of its patch (training crops are half of train.image_size)."""
    if cfg.encoder.arch not in ARCHS:
        raise ConfigError(f"key 'encoder.arch' = {cfg.encoder.arch!r}: expected one of {', '.join(ARCHS)}")
    p = ARCHS[cfg.encoder.arch][0]
    for key, sizes, step in (
        ("crops.image_size", cfg.crops.image_size, p),
        ("crops.crop_size", (cfg.crops.crop_size,), p),
        ("pseudo.image_size", cfg.pseudo.image_size, p),
        ("eval.image_size", cfg.eval.image_size, p),
        ("train.image_size", cfg.train.image_size, 2 * p),
    ):
        if any(s % step for s in sizes):
            raise ConfigError(
                f"key '{key}' = {sizes if len(sizes) > 1 else sizes[0]}: expected multiples of {step} "
                f"(patch size {p} of encoder '{cfg.encoder.arch}')"
            )


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), e.g. for YAML dumps and MLflow params."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {
        f.name: (
            {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()}
            if is_dataclass(getattr(cfg, f.name))
            else plain(getattr(cfg, f.name))
        )
        for f in fields(cfg)
    }


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
