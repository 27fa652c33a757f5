"""How alike two maps are: Spearman rank correlation and SSIM, in plain numpy.

Both are the measures of Adebayo et al. (2018), "Sanity Checks for Saliency Maps",
https://arxiv.org/abs/1810.03292. Pure functions on 2-D arrays; no scipy or scikit-image at
run time (the tests compare them with ``scipy.stats.spearmanr`` and
``skimage.metrics.structural_similarity``).
"""
from __future__ import annotations

import numpy as np

SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of the flattened values, ties sharing their average rank (as
    ``scipy.stats.rankdata(method="average")``)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    starts_run = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    run_of = np.cumsum(starts_run) - 1
    run_starts = np.flatnonzero(starts_run)
    run_stops = np.append(run_starts[1:], flat.size)
    run_rank = (run_starts + run_stops + 1) / 2.0      # mean of 1-based ranks start+1 .. stop
    ranks = np.empty(flat.size, dtype=np.float64)
    ranks[order] = run_rank[run_of]
    return ranks


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's rank correlation of two same-shaped arrays (Pearson correlation of their
    average ranks). A constant array has no ranking to agree with: the result is 0 there,
    where scipy returns NaN."""
    if np.shape(first) != np.shape(second):
        raise ValueError(f"shapes differ: {np.shape(first)} vs {np.shape(second)}")
    first_ranks, second_ranks = average_ranks(first), average_ranks(second)
    first_ranks -= first_ranks.mean()
    second_ranks -= second_ranks.mean()
    scale = np.sqrt(np.dot(first_ranks, first_ranks) * np.dot(second_ranks, second_ranks))
    if scale == 0.0:
        return 0.0
    return float(np.clip(np.dot(first_ranks, second_ranks) / scale, -1.0, 1.0))


def normalized(values: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1] as float64; a constant array becomes all zeros."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _window_means(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of every window x window block lying fully inside the array (summed-area table)."""
    table = np.pad(values, ((1, 0), (1, 0))).cumsum(axis=0).cumsum(axis=1)
    sums = (table[window:, window:] - table[:-window, window:]
            - table[window:, :-window] + table[:-window, :-window])
    return sums / float(window * window)


def ssim(first: np.ndarray, second: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity (Wang et al. 2004) of two 2-D arrays with scikit-image's
    defaults: a 7 x 7 uniform window (smaller for arrays under 7 px), sample covariances,
    K1 = 0.01, K2 = 0.03, averaged over the windows that lie fully inside the image."""
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 2:
        raise ValueError(f"expected two same-shaped 2-D arrays, got {first.shape}, {second.shape}")
    window = min(SSIM_WINDOW, min(first.shape) - (1 - min(first.shape) % 2))
    if window < 3:
        raise ValueError(f"SSIM needs arrays of at least 3 x 3, got {first.shape}")
    count = window * window
    covariance_scale = count / (count - 1.0)
    mean_first, mean_second = _window_means(first, window), _window_means(second, window)
    variance_first = covariance_scale * (_window_means(first * first, window)
                                         - mean_first * mean_first)
    variance_second = covariance_scale * (_window_means(second * second, window)
                                          - mean_second * mean_second)
    covariance = covariance_scale * (_window_means(first * second, window)
                                     - mean_first * mean_second)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    numerator = (2 * mean_first * mean_second + c1) * (2 * covariance + c2)
    denominator = ((mean_first ** 2 + mean_second ** 2 + c1)
                   * (variance_first + variance_second + c2))
    return float((numerator / denominator).mean())
