"""The config's sections as typed dataclasses; their defaults are the `reference` profile at COCO scale.

Choices are `Literal` types (the loader rejects any other value). The image sizes tied by the paper and the
reference code default to None and are derived from `pseudo.image_size` by `derive_sizes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# the arithmetic an encoder use runs in (transfgu_dist.method.precision): fp32 is the authors' (reference)
Precision = Literal["fp32", "tf32", "bf16"]


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

    layout: Literal["synthetic", "folder", "cocostuff", "voc", "cityscapes", "lip"] = "synthetic"
    root: str = ""  # local path or s3:// URI; "" = generate synthetic scenes under the output
    train_split: str = "train"
    val_split: str = "val"
    n_classes: int = 8  # ground-truth classes scored at evaluation
    limit: int | None = None  # use only the first N images of each split (smoke runs)
    train_list: str | None = None  # file of image ids (one a line) restricting the train split, e.g. the
    val_list: str | None = None  # curated COCO lists; local, s3:// or a name under data.root (None: whole split)
    synthetic_train: int = 48
    synthetic_val: int = 16
    synthetic_size: int = 128
    # reference: nearest (COCO full images) / plain bilinear, labels `nearest` | antialias: antialiased bilinear,
    # RoI-Align crops (transfgu_dist.method.resizing)
    resize: Literal["reference", "antialias"] = "reference"


@dataclass
class EncoderConfig:
    """Frozen DINO ViT (paper sec 3.1, 4.2)."""

    # a name in ARCHS: DINO v1 vit_{small,base}_patch{8,16}, DINOv2 vit_{small,base}_patch14[_reg4]_dinov2,
    # DINOv3 vit_{small,base}_patch16_dinov3, or a *_tiny_test
    arch: str = "vit_small_patch8"
    weights: str = "timm"  # "timm" (timm's DINO/DINOv2/DINOv3 weights), an official .pth path or s3:// URI, or "random"
    random_fallback: bool = False  # demo only: fall back to random weights (loudly) when none can be loaded


@dataclass
class CropConfig:
    """Sliding-window crops with the foreground prior (sec 3.2, 4.2)."""

    betas: tuple[float, ...] = (0.5, 0.4, 0.3, 0.2)
    image_size: tuple[int, int] | None = None  # full image resized to this before cropping (None: derived)
    crop_size: int | None = None  # every crop resized to this square (None: derived, min(H,W)/2)
    prior: Literal["attention", "none", "all_fg"] = "attention"  # none: Cityscapes | all_fg: LIP
    fg_min: float = 0.5
    bg_min: float = 0.8
    feature_dtype: Literal["float32", "float16"] = "float32"  # stored CLS features: float16 is half the size
    # reference: (b+1)-token windows, (b+1)*p-1 px, fg fraction over that pixel crop | paper: b tokens
    window_rule: Literal["reference", "paper"] = "reference"
    precision: Precision = "fp32"  # the encoder forwards of extract
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
    similarity: Literal["dot", "cosine"] = "cosine"  # dot: x S^T / sqrt(d) (Eq. 5) | cosine (reference)
    # paper: M = dSim/dA + A (Eq. 7) | reference: max-normalised A + top-mass rectified gradient
    response: Literal["paper", "reference"] = "reference"
    loss_scale: float | None = None  # Grad-CAM loss factor; None: 1/len(batch) for every batch, a final partial
    # one too (reference: batch-mean loss) | paper: 1.0
    top_mass: float = 0.8  # reference: keep the gradient on its top 80% mass
    split_fg_bg: bool = False  # paper sec 4.2: fg pixels get no bg concepts and vice versa
    # stored per-concept terms: float32 (reference: every argmax kept) | float16 (half the size)
    terms_dtype: Literal["float32", "float16"] = "float32"
    precision: Precision = "fp32"  # Grad-CAM's forward and backward
    batch_size: int = 8  # images per Grad-CAM batch
    images_per_part: int = 256  # images per bank part: 27 x 40 x 40 fp32 terms = 179 KB an image, ~46 MB a part


@dataclass
class DecoderConfig:
    """Segmenter mask transformer (Eq. 2)."""

    n_layers: int = 2
    n_heads: int = 6
    dropout: float = 0.1
    # scaled_dot: x'C^T/sqrt(d) (Eq. 2) | cosine_ln (reference)
    mask_head: Literal["scaled_dot", "cosine_ln"] = "cosine_ln"
    block_eps: float = 1e-5  # LayerNorm eps in the blocks: reference 1e-5 | timm's Block default 1e-6
    # orthogonal: (1, K, d) orthogonal_, each row norm ~1/sqrt(K) (reference) | trunc_normal: std 0.02
    class_init: Literal["orthogonal", "trunc_normal"] = "orthogonal"


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
    # paper: 1 + mean(CC^T)/sqrt(d) | reference: mean over pairs of 1 + cos
    diversity: Literal["paper", "reference"] = "reference"
    label_norm: Literal["none", "minmax"] = "minmax"  # reference: per-crop min-max of the pseudo label


@dataclass
class TrainConfig:
    """Teacher-student bootstrapping on Ray Train (sec 3.3)."""

    round_epochs: tuple[int, ...] = (2, 2, 2)  # epochs of round 0 (plain CE on M), 1 (teacher = round 0), ...
    batch_size: int = 16  # per worker
    lr: float = 1e-4
    weight_decay: float = 5e-4
    grad_clip: float = 1.0  # gradient value clamp
    reset_optimizer: bool = False  # reference keeps the Adam state across student resets
    image_size: tuple[int, int] | None = None  # input before the random crop (crop resized to half; None: derived)
    num_workers: int | tuple[int, ...] = 1  # Ray Train workers; [min, max]: elastic, the group resizes between
    # them as nodes come and go (per-worker batch_size and lr unchanged: the global batch is size x batch_size)
    cpus_per_worker: float = 1.0
    use_gpu: bool | None = True  # one GPU per worker; None: GPUs if the cluster has some at the start (demo, laptop)
    max_failures: int = 2
    data_fraction: float = 1.0  # train on a random fraction of the bank (sweeps)
    epoch_repeat: int = 1  # passes over the training set per epoch (reference VOC/Cityscapes: 20)
    eval_every: int = 1  # val mIoU every N epochs on rank 0 (0: never)
    seed: int = 2021
    per_batch_augment: bool = True  # reference: one photometric draw per batch
    best_by: Literal["miou_plus_acc", "miou"] = "miou_plus_acc"  # what best.pt maximises
    skip_nonpositive_loss: bool = True  # reference: no optimizer step when the total loss is <= 0
    precision: Precision = "fp32"  # the frozen encoder's forward in training
    drop_last: bool = True  # reference: each worker's last partial batch of an epoch is not trained on
    # global: the whole training set reshuffled every epoch, seeded by (seed, epoch) (the authors' loader) | local:
    # order-kept shards shuffled in a buffer of 4 batches (no all-to-all exchange)
    shuffle: Literal["global", "local"] = "global"


@dataclass
class EvalConfig:
    """Evaluation on the val split (paper sec 4.1)."""

    image_size: tuple[int, int] | None = None  # val images and labels resized to this (None: derived)
    batch_size: int = 16
    n_overlays: int = 8
    checkpoint: str = ""  # "" = bootstrap/final.pt (last epoch), "best" = bootstrap/best.pt (best
    # epoch on val, the reference protocol's pick), or a checkpoint URI
    crf: bool = False  # dense-CRF refinement before scoring (crf.py; the paper reports without)
    precision: Precision = "fp32"  # evaluate, predict and validation during training


@dataclass
class ProbeConfig:
    """The linear probe (supervised, off by default): a 1x1 linear head on the frozen encoder's patch features,
    trained with the train split's labels on one Ray Train worker (train.use_gpu, train.cpus_per_worker), scored on
    val beside the unsupervised figures (STEGO's "Linear" column)."""

    enabled: bool = False
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0


@dataclass
class ResourcesConfig:
    """What the stages ask Ray for, so the autoscaler adds the nodes that provide it (cluster/aws-gpu.yaml)."""

    actor_gpus: float | None = 1.0  # GPUs per encoder actor (extract, pseudo_label, evaluate, predict); 0.5 packs
    # two actors on a GPU | None: 1 if the cluster has GPUs when the stage starts, else one CPU actor (demo, laptop)
    pool_min: int = 1  # encoder actors a pool starts with
    pool_max: int = 4  # encoder actors a pool grows to as nodes join: pool_max x actor_gpus GPUs (aws-gpu.yaml: 4)
    decode_cpus: float = 1.0  # CPUs per read/decode task
    cluster_gpu: bool | None = True  # the cluster stage's k-means on a GPU node | None: if the cluster has one


@dataclass
class Config:
    """A run: its preset and profile, where it writes and tracks, and one typed section per pipeline part."""

    preset: str = "synthetic"
    profile: Literal["reference", "paper"] = "reference"
    output: str = "outputs/synthetic"  # local path or s3:// URI
    source: str = ""  # an earlier run's output whose data, features, concepts and bank to reuse
    mlflow_uri: str = ""  # MLflow tracking URI; "" = MLFLOW_TRACKING_URI or sqlite under the output
    experiment: str = "transfgu-dist"  # MLflow experiment name
    mlflow_artifacts: str = ""  # artifact root of an experiment this run creates (local or s3://); "" =
    # <output>/mlflow-artifacts on s3://, else beside a SQLite store
    seed: int = 2021
    # run_all with seeds > 1: bootstrap and evaluate once per seed (train.seed, probe.seed + 0..seeds-1) on the same
    # features, concepts and bank, in parallel on Ray Tune, reported as mean and sample std (pipeline.seeds)
    seeds: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

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
        """K, the concepts k-means finds: k_fg + k_bg (paper sec 3.2)."""
        return self.cluster.k_fg + self.cluster.k_bg

    @property
    def n_outputs(self) -> int:
        """The decoder's output channels: the K concepts, plus the background channel of things-only presets."""
        return self.n_concepts + int(self.loss.background_channel)


def worker_range(num_workers: int | tuple[int, ...]) -> tuple[int, int]:
    """`train.num_workers` as (min, max): a fixed size n is (n, n)."""
    return (num_workers, num_workers) if isinstance(num_workers, int) else (num_workers[0], num_workers[-1])


# key -> the rule `derive_sizes` applies when the key is None, in the order it applies them
DERIVED_SIZES = {
    "crops.image_size": "2 x pseudo.image_size",
    "crops.crop_size": "min(crops.image_size) / 2",
    "train.image_size": "pseudo.image_size",
    "eval.image_size": "train.image_size",
}


def derive_sizes(cfg: Config) -> None:
    """Fill the image sizes left None from `pseudo.image_size`, the size Grad-CAM pseudo labels are made at.

    The reference code resizes full images to twice that size for cropping; the paper resizes every crop to
    min(H, W)/2 of that image (sec 3.2); training and validation use the pseudo-label size.
    """
    if cfg.crops.image_size is None:
        cfg.crops.image_size = (2 * cfg.pseudo.image_size[0], 2 * cfg.pseudo.image_size[1])
    if cfg.crops.crop_size is None:
        cfg.crops.crop_size = min(cfg.crops.image_size) // 2
    if cfg.train.image_size is None:
        cfg.train.image_size = cfg.pseudo.image_size
    if cfg.eval.image_size is None:
        cfg.eval.image_size = cfg.train.image_size
