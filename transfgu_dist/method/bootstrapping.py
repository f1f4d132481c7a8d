"""Teacher-student bootstrapping (paper sec 3.3, Eqs 9-16): one worker's training step in plain PyTorch.

The Ray Train loop (pipeline.stages.bootstrap), the benchmark and a single-process run build the same Bootstrapper;
rank, device and the data-parallel wrapper are passed in.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from transfgu_dist.config import Config
from transfgu_dist.method.augment import AugmentConfig, crop_and_flip, photometric, random_crop_boxes
from transfgu_dist.method.decoder import MaskTransformer
from transfgu_dist.method.encoder import ViTEncoder, normalize
from transfgu_dist.method.losses import cross_entropy, diversity_loss, peer_loss, total_loss, uncertainty_loss
from transfgu_dist.method.precision import autocast
from transfgu_dist.method.resizing import resizing, unit_float
from transfgu_dist.method.targets import bootstrapped, fg_bg_split, hard_labels, label_scores


def alpha_at(cfg: Config, epoch_in_round: int) -> float:
    """Eq. 13's alpha; the reference grows it per epoch since the last teacher update, capped."""
    return min(cfg.loss.alpha + cfg.loss.alpha_step * epoch_in_round, cfg.loss.alpha_max)


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam with L2 weight decay on matrices only (biases and norms undecayed), as the reference."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.Adam(
        [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.train.lr,
    )


class Bootstrapper:
    """One worker's state: frozen encoder, student, teacher, optimizer, and the step of Eqs 9-16."""

    def __init__(
        self,
        cfg: Config,
        encoder: ViTEncoder,
        is_fg: np.ndarray,
        dev: torch.device,
        rank: int = 0,
        wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    ):
        """encoder: the frozen encoder (moved to `dev`); is_fg: the concepts' fg flags; rank: this worker's rank
        (its augmentation stream is seeded with train.seed + rank); wrap: the data-parallel wrapper of the student
        (DDP under Ray Train), identity in one process."""
        self.cfg, self.dev = cfg, dev
        self.encoder = encoder.to(dev)
        torch.manual_seed(cfg.train.seed)
        self.student = MaskTransformer(self.encoder.dim, cfg.n_outputs, cfg.decoder).to(dev)
        self.initial = copy.deepcopy(self.student.state_dict())
        self.teacher: MaskTransformer | None = None
        self.optimizer = make_optimizer(self.student, cfg)
        self.aug = AugmentConfig(per_batch=cfg.train.per_batch_augment, crop_resize=resizing(cfg.data).crops)
        self.gen = torch.Generator(device=dev).manual_seed(cfg.train.seed + rank)
        split = fg_bg_split(cfg.pseudo.split_fg_bg, is_fg)
        self.is_fg = None if split is None else torch.from_numpy(split).to(dev)
        self.model = wrap(self.student)

    def start_round(self) -> None:
        """Sec 3.3: teacher <- current student; student <- its initial state."""
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.student.load_state_dict(self.initial)
        if self.cfg.train.reset_optimizer:
            self.optimizer = make_optimizer(self.student, self.cfg)

    def state(self, round_: int, epoch: int) -> dict[str, Any]:
        """Everything the next epoch depends on, random number streams included (the global one drives dropout,
        `gen` the augmentations), so a resumed run continues the uninterrupted one bit for bit."""
        return {
            "student": self.student.state_dict(),
            "initial": self.initial,
            "optimizer": self.optimizer.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher else None,
            "round": round_,
            "epoch": epoch,
            "rng": self.rng_state(),
        }

    def rng_state(self) -> dict[str, torch.Tensor | None]:
        """This worker's random number streams (each rank has its own: `gen` is seeded with train.seed + rank)."""
        return {
            "torch": torch.get_rng_state(),
            "gen": self.gen.get_state(),
            "cuda": torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.initial = state["initial"]
        self.optimizer.load_state_dict(state["optimizer"])
        if state["teacher"] is not None:
            self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
            self.teacher.load_state_dict(state["teacher"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        self.gen.set_state(rng["gen"].cpu())
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.dev)

    def targets(self, maps: torch.Tensor, fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Soft labels M of the crop (Eq. 8 where configured) and the pseudo-foreground pixels."""
        loss = self.cfg.loss
        scores = label_scores(maps, fg, self.is_fg, loss)
        valid = scores[:, 1:].amax(1) > loss.t_bg if loss.background_channel else None
        return scores, valid

    def step(self, batch: dict[str, torch.Tensor], alpha: float) -> dict[str, float]:
        """One optimizer step on a batch of uint8 or [0, 1] float images (B, H, W, 3), response maps (B, K, h, w)
        and fg priors (B, h, w); returns the loss terms."""
        cfg = self.cfg
        images = photometric(unit_float(batch["image"].permute(0, 3, 1, 2)), self.aug, self.gen)
        maps, fg = batch["maps"], batch["fg_prior"].float()
        B, K, h, w = maps.shape
        H, W = images.shape[-2:]
        boxes = random_crop_boxes(B, H, W, self.aug, self.gen)
        images, labels = crop_and_flip(
            images,
            torch.cat([maps, fg[:, None]], 1),
            boxes,
            (H // 2, W // 2),
            (H // 2 // self.encoder.patch_size, W // 2 // self.encoder.patch_size),
            self.aug,
            self.gen,
        )
        scores, valid = self.targets(labels[:, :K], labels[:, K] > 0.5)
        with torch.no_grad(), autocast(self.dev, cfg.train.precision):
            patch = self.encoder(normalize(images)).patch.float()
        out = self.model(patch)
        if self.teacher is None:
            peer = cross_entropy(out.logits, hard_labels(scores))  # Eq. 9
        else:
            with torch.no_grad():
                scores = bootstrapped(scores, self.teacher(patch).logits)  # Eqs 10, 12
            perm = torch.randperm(scores.shape[1], generator=self.gen, device=self.gen.device).to(self.dev)
            peer = peer_loss(out.logits, hard_labels(scores), alpha, perm)  # Eqs 11, 13
        terms = total_loss(
            peer,
            diversity_loss(out.class_emb, cfg.loss.diversity),
            uncertainty_loss(out.logits, valid, skip_channel0=cfg.loss.background_channel),
            cfg.loss.omega1,
            cfg.loss.omega2,
        )  # Eqs 14-16
        optimizer_step(self.optimizer, self.student, terms.total, cfg)
        return terms.as_floats()


def optimizer_step(optimizer: torch.optim.Optimizer, model: nn.Module, loss: torch.Tensor, cfg: Config) -> bool:
    """Backward, gradient value clamp and step; with train.skip_nonpositive_loss (reference) none when loss <= 0."""
    optimizer.zero_grad(set_to_none=True)
    if cfg.train.skip_nonpositive_loss and loss.item() <= 0:
        return False
    loss.backward()
    nn.utils.clip_grad_value_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    return True


INITIAL_BEST_SCORE = 0.0  # the authors' best score before the first validation: a later epoch must beat it


def selection_score(metrics: dict[str, float], best_by: str) -> float:
    """Score the best checkpoint maximises: val mIoU, or (reference) mIoU + pixel accuracy."""
    return metrics["val/miou"] + (metrics["val/pixel_accuracy"] if best_by == "miou_plus_acc" else 0.0)
