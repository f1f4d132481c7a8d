"""The trained segmenter as one object: frozen encoder + bootstrapped decoder (paper sec 3.1, Eq. 2), the eval
resolution, class names and the Hungarian matching of an evaluate run (sec 4.1).

`predict` is the authors' evaluation forward (logits upsampled bilinearly, argmax), shared by evaluate, bootstrap
validation and the predict stage; `Segmenter.segment` applies it to images of any size and returns label maps at
each image's own size.
Nothing here imports Ray, FAISS or MLflow.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from transfgu_dist.config import ARCHS, Config, DecoderConfig, EncoderConfig
from transfgu_dist.io import storage
from transfgu_dist.io.images import as_rgb, model_batch, model_input, to_float_batch
from transfgu_dist.io.weights import build_encoder
from transfgu_dist.method.crf import CRFConfig, dense_crf
from transfgu_dist.method.decoder import MaskTransformer
from transfgu_dist.method.encoder import ViTEncoder, normalize
from transfgu_dist.method.precision import autocast
from transfgu_dist.method.resizing import resizing

CHECKPOINT_KEYS = ("decoder", "n_outputs", "encoder", "round")
ARTIFACT_FORMAT = "transfgu-segmenter/1"
ARTIFACT_KEYS = ("format", "decoder", "n_outputs", "decoder_config", "encoder", "image_size", "class_names", "matching")
UNMATCHED = 254  # label PNG value of a cluster the matching leaves without a class (255 stays "ignore")


class CheckpointError(ValueError):
    """A file is not the checkpoint this config expects; the message names the file."""


LOADABLE = (
    "a torch.save file of tensors and plain types: a bootstrap final.pt / best.pt / round-N.pt, or a "
    "jobs/export.py artifact"
)


def _reason(e: Exception, path: str) -> str:
    """One line of torch.load's (often multi-line) error: the unpickler's own complaint where it gives one, and
    a cut zip archive (torch.save's format) called what it is."""
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path):
            return "a zip archive without its central directory: truncated"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), None)
    if marker is not None and marker + 1 < len(lines):
        return f"unpickler: {lines[marker + 1]}"
    return lines[0][:300]


def _torch_load(uri: str) -> Any:
    with storage.local_copy(uri) as path:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a wrong file
            raise CheckpointError(
                f"{uri}: not a readable PyTorch checkpoint; expected {LOADABLE} ({_reason(e, path)})"
            ) from e


def _build_decoder(uri: str, state: dict, width: int, n_outputs: int, cfg: DecoderConfig, expected: str):
    decoder = MaskTransformer(width, n_outputs, cfg)
    try:
        decoder.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{uri}: {expected}; its decoder weights do not fit ({e})") from e
    return decoder.eval()


def load_decoder(uri: str, cfg: Config) -> MaskTransformer:
    """The bootstrap stage's decoder from `uri` ({decoder, n_outputs, encoder, round}), checked against `cfg`."""
    ckpt = _torch_load(uri)
    arch, width = cfg.encoder.arch, ARCHS[cfg.encoder.arch][1]
    expected = (
        f"expected a bootstrap checkpoint dict with keys {', '.join(CHECKPOINT_KEYS)} for "
        f"{cfg.n_outputs} outputs on encoder '{arch}' (width {width})"
    )
    if not isinstance(ckpt, dict) or not set(CHECKPOINT_KEYS) <= ckpt.keys():
        got = f"keys {', '.join(map(str, list(ckpt)[:4]))} ..." if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{uri}: {expected}; got {got}")
    if ckpt["n_outputs"] != cfg.n_outputs:
        raise CheckpointError(f"{uri}: {expected}; got n_outputs {ckpt['n_outputs']}")
    got_arch = ckpt["encoder"].get("arch") if isinstance(ckpt["encoder"], dict) else None
    if got_arch != arch:
        raise CheckpointError(f"{uri}: {expected}; got a decoder trained on encoder '{got_arch}'")
    return _build_decoder(uri, ckpt["decoder"], width, cfg.n_outputs, cfg.decoder, expected)


@torch.no_grad()
def cluster_logits(
    encoder: ViTEncoder, decoder: MaskTransformer, images: torch.Tensor, precision: str = "fp32"
) -> torch.Tensor:
    """Decoder masks (B, n_outputs, h, w) at the patch grid for float NCHW images in [0, 1] (Eq. 2), computed in
    `precision` (method.precision), returned in float32."""
    with autocast(images.device, precision):
        return decoder(encoder(normalize(images)).patch).logits.float()


@torch.no_grad()
def predict(
    encoder: ViTEncoder,
    decoder: MaskTransformer,
    images: torch.Tensor,
    size: tuple[int, int],
    crf: CRFConfig | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Cluster index per pixel at `size`: `pixel_labels` of the decoder's patch-grid logits."""
    return pixel_labels(cluster_logits(encoder, decoder, images, precision), images, size, crf)


@torch.no_grad()
def pixel_labels(
    logits: torch.Tensor, images: torch.Tensor, size: tuple[int, int], crf: CRFConfig | None = None
) -> np.ndarray:
    """`predict` from patch-grid logits (B, n_outputs, h, w): upsampled bilinearly to `size`, refined by the dense
    CRF when `crf` is given (images at `size`), argmax."""
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    if crf is not None:
        rgb = images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        logits = torch.stack([dense_crf(im, lg, crf) for im, lg in zip(rgb, logits)])
    return logits.argmax(1).cpu().numpy()


@dataclass
class SlidingWindow:
    """Sliding-window inference (off by default: images are resized to the eval size, as evaluation does).
    Windows of the training input size (`train.image_size`) at `stride` cover the image at its own resolution
    (upscaled, aspect kept, when a side is shorter than the window); overlapping logits are averaged."""

    window: tuple[int, int] = (320, 320)
    stride: int = 160
    batch_size: int = 16  # windows per forward


def window_origins(size: tuple[int, int], window: tuple[int, int], stride: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the windows covering `size` (>= window): every `stride`, the last at the edge."""
    if stride < 1:
        raise ValueError(f"sliding-window stride must be >= 1 pixel, got {stride}")
    axes = []
    for n, w in zip(size, window):
        starts = list(range(0, n - w + 1, stride))
        axes.append(starts if starts[-1] == n - w else starts + [n - w])
    return [(y, x) for y in axes[0] for x in axes[1]]


@torch.no_grad()
def sliding_logits(
    encoder: ViTEncoder,
    decoder: MaskTransformer,
    image: np.ndarray,
    sw: SlidingWindow,
    device: torch.device,
    precision: str = "fp32",
) -> torch.Tensor:
    """(K, H, W) logits at the size of `image` (H, W, 3) uint8: each window's logits upsampled to the window,
    averaged over the windows covering each pixel, resized back when the image was upscaled."""
    (H, W), (wh, ww) = image.shape[:2], sw.window
    scale = max(1.0, wh / H, ww / W)
    size = (max(wh, round(H * scale)), max(ww, round(W * scale)))
    x = to_float_batch(image, size).to(device)[0]
    origins = window_origins(size, sw.window, sw.stride)
    total = count = None
    for i in range(0, len(origins), sw.batch_size):
        chunk = origins[i : i + sw.batch_size]
        crops = torch.stack([x[:, y : y + wh, c : c + ww] for y, c in chunk])
        up = cluster_logits(encoder, decoder, crops, precision)
        up = F.interpolate(up, size=(wh, ww), mode="bilinear", align_corners=False)
        if total is None:
            total = up.new_zeros((up.shape[1], *size))
            count = up.new_zeros(size)
        for (y, c), lg in zip(chunk, up):
            total[:, y : y + wh, c : c + ww] += lg
            count[y : y + wh, c : c + ww] += 1
    logits = total / count
    if size == (H, W):
        return logits
    return F.interpolate(logits[None], size=(H, W), mode="bilinear", align_corners=False)[0]


@dataclass
class Segmenter:
    encoder: ViTEncoder
    decoder: MaskTransformer
    encoder_cfg: EncoderConfig
    decoder_cfg: DecoderConfig
    image_size: tuple[int, int] = (320, 320)  # the eval resolution images are resized to
    class_names: list[str] = field(default_factory=list)
    matching: np.ndarray | None = None  # (K,) class id per cluster or -1 (evaluate's metrics.json)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    crf: CRFConfig | None = None  # dense-CRF refinement at each image's size (off: None)
    sliding: SlidingWindow | None = None  # sliding-window inference (off: resize to image_size)
    resize: str = "antialias"  # images.to_float_batch method: data.resize's eval images
    precision: str = "fp32"  # eval.precision (method.precision)

    @classmethod
    def from_checkpoint(
        cls,
        uri: str,
        cfg: Config | None = None,
        metrics: str | None = None,
        class_names: Sequence[str] = (),
        device: str | torch.device = "cpu",
    ) -> Segmenter:
        """An exported artifact (jobs/export.py: needs nothing else), or a bootstrap `final.pt` / `best.pt`
        (local or s3://) with the training `cfg`; `metrics` is an evaluate metrics.json whose matching maps
        clusters to classes."""
        ckpt = _torch_load(uri)
        if isinstance(ckpt, dict) and ckpt.get("format") == ARTIFACT_FORMAT:
            seg = cls.from_artifact(ckpt, uri)
        elif cfg is None:
            raise CheckpointError(
                f"{uri}: a bootstrap checkpoint needs the training config (--config); only an "
                f"artifact written by jobs/export.py loads on its own"
            )
        else:
            seg = cls(
                build_encoder(cfg.encoder),
                load_decoder(uri, cfg),
                cfg.encoder,
                cfg.decoder,
                tuple(cfg.eval.image_size),
                list(class_names),
                resize=resizing(cfg.data).images,
                precision=cfg.eval.precision,
            )
        if metrics:
            seg.matching = read_matching(metrics, seg.decoder.n_outputs)
            seg.class_names = list(storage.read_json(metrics)["per_class_iou"]) or seg.class_names
        return seg.to(device)

    @classmethod
    def from_artifact(cls, art: dict[str, Any], uri: str = "artifact") -> Segmenter:
        """The inverse of `artifact()`: the encoder from its embedded weights, else rebuilt from its weights
        source (which must then be reachable)."""
        missing = [k for k in ARTIFACT_KEYS if k not in art]
        if missing:
            raise CheckpointError(
                f"{uri}: expected an exported segmenter with keys {', '.join(ARTIFACT_KEYS)}; "
                f"missing {', '.join(missing)}"
            )
        enc, dec = EncoderConfig(**art["encoder"]), DecoderConfig(**art["decoder_config"])
        decoder = _build_decoder(
            uri, art["decoder"], ARCHS[enc.arch][1], art["n_outputs"], dec, "expected an exported segmenter"
        )
        if art.get("encoder_weights") is None:
            encoder = build_encoder(enc)
        else:
            encoder = build_encoder(EncoderConfig(arch=enc.arch, weights="random"))
            encoder.vit.load_state_dict(art["encoder_weights"])
        return cls(
            encoder,
            decoder,
            enc,
            dec,
            tuple(art["image_size"]),
            list(art["class_names"]),
            None if art["matching"] is None else np.asarray(art["matching"], np.int64),
            resize=art.get("resize", "antialias"),
            precision=art.get("precision", "fp32"),
        )

    def to(self, device: str | torch.device) -> Segmenter:
        self.device = torch.device(device)
        self.encoder.to(self.device).eval()
        self.decoder.to(self.device).eval()
        return self

    def artifact(self, embed_encoder: bool = True) -> dict[str, Any]:
        """The self-contained export: decoder weights, the encoder's arch and weights source, and (`embed_encoder`)
        the encoder's weights, so it reloads offline; without them the weights source must be reachable."""
        return {
            "format": ARTIFACT_FORMAT,
            "decoder": self.decoder.state_dict(),
            "n_outputs": self.decoder.n_outputs,
            "decoder_config": asdict(self.decoder_cfg),
            "encoder": asdict(self.encoder_cfg),
            "encoder_weights": {k: v.cpu() for k, v in self.encoder.vit.state_dict().items()}
            if embed_encoder
            else None,
            "image_size": list(self.image_size),
            "class_names": list(self.class_names),
            "matching": None if self.matching is None else self.matching.tolist(),
            "resize": self.resize,
            "precision": self.precision,
        }

    def name_clusters(self, names: list[str]) -> None:
        """Name the clusters (one name per cluster): label maps then hold cluster ids and legends these names; an
        evaluate run's matching is no longer applied."""
        self.class_names, self.matching = list(names), None

    def legend(self) -> list[str]:
        """The name of each label value: matched class names, cluster names (name_clusters), else `cluster <k>`."""
        n = self.decoder.n_outputs
        if self.matching is not None or len(self.class_names) == n:
            return list(self.class_names)
        return [f"cluster {k}" for k in range(n)]

    def to_classes(self, clusters: np.ndarray) -> np.ndarray:
        """Cluster ids -> class ids through the matching (unmatched: UNMATCHED); raw clusters without one."""
        if self.matching is None:
            return clusters.astype(np.uint8)
        return np.where(self.matching >= 0, self.matching, UNMATCHED).astype(np.uint8)[clusters]

    def logits(self, images: Sequence[Any]) -> torch.Tensor:
        """Cluster logits (B, n_outputs, h, w) at the patch grid for images preprocessed as everywhere
        (images.model_input)."""
        batch = np.stack([model_input(im, self.image_size, self.resize) for im in images])
        return cluster_logits(self.encoder, self.decoder, model_batch(batch, self.device), self.precision)

    def segment(self, images: Any) -> list[np.ndarray]:
        """Label maps (uint8, each at its image's size): matched class ids, or cluster ids without a matching.
        `images`: one image or a list of PIL images / numpy arrays / tensors of any sizes."""
        single = hasattr(images, "convert") or (hasattr(images, "ndim") and images.ndim in (2, 3))
        images = [images] if single else list(images)
        rgb = [as_rgb(im) for im in images]
        grids = self.logits(rgb) if self.sliding is None else [None] * len(rgb)
        return [self.labels(self.scores(im, grid)) for grid, im in zip(grids, rgb)]

    def scores(self, image: np.ndarray, grid: torch.Tensor | None = None) -> torch.Tensor:
        """(K, H, W) per-cluster scores at the size of `image` (uint8 HWC): logits (sliding-window, or the
        patch-grid `grid` logits upsampled bilinearly, align_corners=False), or the CRF's
        probabilities when a CRF is configured."""
        if self.sliding is not None:
            up = sliding_logits(self.encoder, self.decoder, image, self.sliding, self.device, self.precision)
        else:
            grid = self.logits([image])[0] if grid is None else grid
            up = F.interpolate(grid[None].float(), size=image.shape[:2], mode="bilinear", align_corners=False)[0]
        return up if self.crf is None else dense_crf(image, up, self.crf)

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-pixel cluster probabilities (K, H, W) from `scores()`."""
        return scores if self.crf is not None else scores.softmax(0)

    def labels(self, scores: torch.Tensor) -> np.ndarray:
        """The label map (uint8) of one image's `scores()`: argmax, through the matching."""
        return self.to_classes(scores.argmax(0).cpu().numpy())


def read_matching(uri: str, n_outputs: int) -> np.ndarray:
    """The Hungarian matching (class id per cluster, -1 unmatched) of an evaluate run's metrics.json."""
    try:
        matching = np.asarray(storage.read_json(uri)["matching"], np.int64)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{uri}: expected an evaluate metrics.json with a 'matching' list ({e})") from e
    if matching.shape != (n_outputs,):
        raise CheckpointError(f"{uri}: expected a matching of {n_outputs} clusters, got {matching.shape}")
    return matching
