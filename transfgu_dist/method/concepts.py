"""K-means of crop CLS features into K semantic concepts S (paper sec 3.2, 4.2)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import faiss
import numpy as np
import torch


@functools.cache
def _gpu_resources() -> faiss.StandardGpuResources:
    """One process-wide GPU resource pool (it must outlive every GPU index)."""
    return faiss.StandardGpuResources()


def _flat_l2_index(d: int, use_gpu: bool) -> faiss.Index:
    """Exact L2 index, on the GPU in full fp32 precision when asked."""
    if not use_gpu:
        return faiss.IndexFlatL2(d)
    cfg = faiss.GpuIndexFlatConfig()
    cfg.useFloat16 = False
    return faiss.GpuIndexFlatL2(_gpu_resources(), d, cfg)


def _member_means(x: np.ndarray, labels: np.ndarray, k: int, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Float64 sum of the points of every cluster divided by their count; (k, d) means and (k,) counts."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
    for start in range(0, len(x), chunk):
        rows = torch.from_numpy(x[start : start + chunk]).double()
        sums.index_add_(0, torch.from_numpy(labels[start : start + chunk]), rows)
    counts = np.bincount(labels, minlength=k)
    return sums.numpy() / np.maximum(counts, 1)[:, None], counts


def kmeans(
    x: np.ndarray,
    k: int,
    niter: int = 100,
    seed: int = 1,
    max_points_per_centroid: int | None = None,
    use_gpu: bool | None = None,
    recompute_means: bool = True,
) -> tuple[np.ndarray, float]:
    """FAISS L2 k-means (no normalisation) of (n, d) features; returns (k, d) float32 centroids, objective.

    max_points_per_centroid=None trains on every point (FAISS otherwise subsamples to 256 per
    centroid). recompute_means replaces each centroid by the mean of the points assigned to it
    after training, as the reference does (an empty cluster keeps FAISS's centroid). The objective
    is FAISS's final-iteration sum of squared distances.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means needs at least as many points as clusters: got {n} points for {k} clusters")
    use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
    clus = faiss.Clustering(d, k)
    clus.niter, clus.seed, clus.verbose = niter, seed, False
    clus.max_points_per_centroid = max_points_per_centroid or n // k + 1
    index = _flat_l2_index(d, use_gpu)
    clus.train(x, index)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d)
    objective = float(clus.iteration_stats.at(clus.iteration_stats.size() - 1).obj)
    if recompute_means:
        labels = index.search(x, 1)[1].ravel()
        means, counts = _member_means(x, labels, k)
        centroids = np.where(counts[:, None] > 0, means, centroids)
    return centroids.astype(np.float32), objective


@dataclass
class Concepts:
    """Concept centroids S (K, d), foreground ones first, with the k-means objective of each pool."""

    centroids: np.ndarray
    is_fg: np.ndarray
    objective: dict[str, float]

    @property
    def k_fg(self) -> int:
        return int(self.is_fg.sum())

    @property
    def k_bg(self) -> int:
        return len(self.is_fg) - self.k_fg

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for np.savez / Parquet columns; inverse of from_arrays."""
        return {
            "centroids": self.centroids,
            "is_fg": self.is_fg,
            "objective_names": np.array(list(self.objective), dtype=str),
            "objective_values": np.array(list(self.objective.values()), dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Concepts:
        names, values = arrays["objective_names"], arrays["objective_values"]
        return cls(
            centroids=np.asarray(arrays["centroids"], dtype=np.float32),
            is_fg=np.asarray(arrays["is_fg"], dtype=bool),
            objective={str(name): float(value) for name, value in zip(names, values)},
        )


def fit_concepts(fg: np.ndarray, bg: np.ndarray | None, k_fg: int, k_bg: int, **kmeans_kwargs) -> Concepts:
    """Cluster foreground and background crop features apart, foreground centroids first (sec 4.2).

    k_bg == 0 means a single (foreground) pool and bg is ignored, as for VOC, LIP and Cityscapes.
    """
    centroids, objective = kmeans(fg, k_fg, **kmeans_kwargs)
    parts, objectives = [centroids], {"fg": objective}
    if k_bg > 0:
        if bg is None:
            raise ValueError(f"k_bg={k_bg} background concepts requested but no background features given")
        centroids, objectives["bg"] = kmeans(bg, k_bg, **kmeans_kwargs)
        parts.append(centroids)
    is_fg = np.arange(k_fg + k_bg) < k_fg
    return Concepts(np.concatenate(parts), is_fg, objectives)
