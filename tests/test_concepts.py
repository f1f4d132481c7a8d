import numpy as np
import pytest

from transfgu_dist.method.concepts import Concepts, fit_concepts, kmeans

CENTRES = np.array([[0, 0, 0, 0], [20, 0, 0, 0], [0, 20, 0, 0]], dtype=np.float32)


def blobs(centres: np.ndarray, per_blob: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs (sigma 0.5), rows grouped by blob.

    FAISS seeds k-means with k random rows (no k-means++) that depend only on the row count and
    the FAISS seed: with seed 1 they fall in distinct blobs for 300 rows per blob (for 200 rows per
    blob of three blobs they do not, and Lloyd stays in a local minimum).
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), per_blob)
    x = centres[labels] + rng.normal(scale=0.5, size=(len(labels), centres.shape[1]))
    return x.astype(np.float32), labels


def match(centroids: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Centroids reordered to the nearest given centre."""
    d = ((centres[:, None] - centroids[None]) ** 2).sum(-1)
    return centroids[d.argmin(1)]


def test_kmeans_recovers_separated_blobs():
    x, _ = blobs(CENTRES)
    centroids, objective = kmeans(x, 3, use_gpu=False)
    assert centroids.shape == (3, 4) and centroids.dtype == np.float32
    # sample means lie within ~3 * 0.5 / sqrt(300) = 0.09 of the centres
    np.testing.assert_allclose(match(centroids, CENTRES), CENTRES, atol=0.2)
    # 900 points, 4 dims of variance 0.25 each -> sum of squared distances ~ 900
    assert 750 < objective < 1050


def test_recompute_means_gives_member_means():
    x = np.array([[0, 0], [2, 0], [0, 2], [2, 2], [10, 10], [12, 10], [11, 13]], dtype=np.float32)
    centroids, _ = kmeans(x, 2, recompute_means=True)
    np.testing.assert_array_equal(centroids[np.argsort(centroids[:, 0])], [[1, 1], [11, 11]])


def test_no_subsampling_by_default():
    x, labels = blobs(CENTRES)
    full_means = np.stack([x[labels == j].mean(0) for j in range(3)])
    centroids, _ = kmeans(x, 3, recompute_means=False)
    np.testing.assert_allclose(match(centroids, CENTRES), full_means, atol=1e-4)
    subsampled, _ = kmeans(x, 3, recompute_means=False, max_points_per_centroid=5)
    assert np.abs(match(subsampled, CENTRES) - full_means).max() > 1e-3


def test_kmeans_is_deterministic_for_a_seed():
    x = np.random.default_rng(3).normal(size=(500, 8)).astype(np.float32)
    a, obj_a = kmeans(x, 5, seed=7)
    b, obj_b = kmeans(x, 5, seed=7)
    np.testing.assert_array_equal(a, b)
    assert obj_a == obj_b


def test_kmeans_needs_enough_points():
    with pytest.raises(ValueError, match="2 points for 3 clusters"):
        kmeans(np.zeros((2, 4), dtype=np.float32), 3)


def test_fit_concepts_puts_foreground_first(tmp_path):
    bg_centres = np.array([[-50, 0, 0, 0], [0, -50, 0, 0]], dtype=np.float32)
    fg, _ = blobs(CENTRES)
    bg, _ = blobs(bg_centres, seed=1)
    concepts = fit_concepts(fg, bg, 3, 2)
    assert concepts.centroids.shape == (5, 4)
    assert concepts.is_fg.tolist() == [True, True, True, False, False]
    assert (concepts.k_fg, concepts.k_bg) == (3, 2)
    assert set(concepts.objective) == {"fg", "bg"}
    np.testing.assert_allclose(match(concepts.centroids[:3], CENTRES), CENTRES, atol=0.2)
    np.testing.assert_allclose(match(concepts.centroids[3:], bg_centres), bg_centres, atol=0.2)

    np.savez(tmp_path / "c.npz", **concepts.to_arrays())
    with np.load(tmp_path / "c.npz") as arrays:
        loaded = Concepts.from_arrays(arrays)
    np.testing.assert_array_equal(loaded.centroids, concepts.centroids)
    np.testing.assert_array_equal(loaded.is_fg, concepts.is_fg)
    assert loaded.objective == concepts.objective


def test_fit_concepts_single_pool():
    fg, _ = blobs(CENTRES)
    concepts = fit_concepts(fg, None, 3, 0)
    assert concepts.is_fg.tolist() == [True] * 3
    assert (concepts.k_fg, concepts.k_bg) == (3, 0)
    with pytest.raises(ValueError, match="background"):
        fit_concepts(fg, None, 3, 2)
