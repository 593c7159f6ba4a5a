"""Sample-quality metrics computed by us from features, one code path for every extractor
(METHOD.md, "Evaluation"; the protocol is docs/results-digits.md, "How samples are measured").

Every function takes features ``[N, D]`` (numpy or torch, any float dtype) and computes in
float64, the linear algebra through torch (whose CPU threads the caller sets; numpy's
OpenBLAS threads can slow an ``eigh`` a hundredfold on a busy machine):

* :func:`fid`: the Frechet distance of the two sets' Gaussians (Heusel et al. 2017);
* :func:`kid`: the unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x.y / D + 1)^3`` averaged over random subsets (Binkowski et al. 2018), drawn as
  torch-fidelity draws them, so the two agree to rounding on the same features and seed;
* :func:`inception_score`: ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` splits of the
  (seeded) shuffled logits (Salimans et al. 2016), as torch-fidelity computes it;
* :func:`precision_recall`: improved precision and recall (Kynkaanniemi et al. 2019): each
  set's manifold is the union of balls around its points reaching their k-th nearest
  neighbour in the same set; precision is the fraction of generated points inside the real
  manifold, recall the fraction of real points inside the generated one.

Bad inputs (too few samples, mismatched widths, NaN or inf) raise :class:`ValueError`
saying what to change.
"""

from __future__ import annotations

import numpy as np
import torch

KID_SUBSETS, KID_SUBSET_SIZE, KID_DEGREE = 100, 1000, 3
KID_FULL_KERNEL_MAX = 6000 ** 2  # up to this many kernel values per matrix (288 MB), compute them all once
IS_SPLITS = 10
PR_K = 3


# --------------------------------------------------------------------------- inputs


def as_features(x, what: str = "features", min_rows: int = 2) -> np.ndarray:
    """``x`` as a float64 ``[N, D]`` array with ``N >= min_rows``, all finite."""
    a = x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, np.float64)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"{what} must be [N, D], got shape {a.shape}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{what}: need at least {min_rows} samples, got {a.shape[0]}; "
                         "measure more samples")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} hold NaN or inf: the images or the extractor are broken")
    return a


def _same_width(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two feature sets have different widths ({a.shape[1]} and "
                         f"{b.shape[1]}): measure both with the same extractor")


# --------------------------------------------------------------------------- FID


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance of two Gaussians (Heusel et al. 2017, the FID):
    ``|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))``, with the last trace taken as
    ``Tr((S1^(1/2) S2 S1^(1/2))^(1/2))`` (a similar matrix, symmetric PSD, so only ``eigh``
    is needed and no complex roots appear). float64 numpy throughout."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"need mu [D] and sigma [D, D] twice, got {mu1.shape}, {s1.shape}, "
                         f"{mu2.shape}, {s2.shape}")
    t1, t2 = torch.from_numpy(s1), torch.from_numpy(s2)
    r = _sqrtm_psd(t1)
    m = r @ t2 @ r
    tr_covmean = float(torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``ddof=1``) of ``features [N >= 2, D]``, float64."""
    f = torch.from_numpy(as_features(features))
    centred = f - f.mean(0)
    return f.mean(0).numpy(), (centred.T @ centred / (f.shape[0] - 1)).numpy()


def fid(features1, features2) -> float:
    """FID of two feature sets: :func:`frechet_distance` of their :func:`feature_statistics`."""
    a, b = as_features(features1, "features1"), as_features(features2, "features2")
    _same_width(a, b)
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


# --------------------------------------------------------------------------- KID


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = KID_DEGREE) -> np.ndarray:
    """``k(x, y) = (x.y / D + 1)^degree`` for every pair of rows (Binkowski et al. 2018)."""
    return ((torch.from_numpy(x) @ torch.from_numpy(y).T / x.shape[1] + 1.0) ** degree).numpy()


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 of two sets of ``m`` points from their kernel matrices:
    ``sum_{i!=j} k(x_i, x_j) / m(m-1) + sum_{i!=j} k(y_i, y_j) / m(m-1) - 2 sum_{i,j} k(x_i, y_j) / m^2``
    (the cross term over all pairs, as Binkowski et al. and torch-fidelity take it)."""
    m = k_xx.shape[0]
    xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    yy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(xx + yy - 2 * k_xy.sum() / (m * m))


def kid(features1, features2, *, subsets: int = KID_SUBSETS, subset_size: int | None = KID_SUBSET_SIZE,
        seed: int = 0, degree: int = KID_DEGREE) -> tuple[float, float]:
    """KID: the mean and (population) std over ``subsets`` draws of :func:`mmd2_unbiased`
    with :func:`polynomial_kernel` between ``subset_size`` points drawn without replacement
    from each set (``None`` or more than a set holds: the smaller set's size). The draws come
    from ``numpy.random.RandomState(seed)``, set 1 then set 2 per subset, as torch-fidelity
    draws them."""
    a, b = as_features(features1, "features1"), as_features(features2, "features2")
    _same_width(a, b)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(a.shape[0], b.shape[0]) if subset_size is None else min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 points, got {m}")
    rng = np.random.RandomState(seed)
    draws = [(rng.choice(a.shape[0], m, replace=False), rng.choice(b.shape[0], m, replace=False))
             for _ in range(subsets)]
    if max(a.shape[0], b.shape[0]) ** 2 <= KID_FULL_KERNEL_MAX:
        values = _mmd2_of_subsets(a, b, draws, degree)
    else:
        values = np.array([mmd2_unbiased(polynomial_kernel(a[ia], a[ia], degree), polynomial_kernel(a[ia], b[ib], degree),
                                         polynomial_kernel(b[ib], b[ib], degree)) for ia, ib in draws])
    return float(values.mean()), float(values.std())


def _mmd2_of_subsets(a: np.ndarray, b: np.ndarray, draws, degree: int) -> np.ndarray:
    """:func:`mmd2_unbiased` of every drawn pair of subsets at once: each kernel value is
    computed once, and the sum of a subset's block ``K[I, J]`` is ``u_I^T K u_J`` with
    ``u`` the subsets' indicator vectors (one matrix product for all subsets)."""
    m = len(draws[0][0])
    ua, ub = torch.zeros(a.shape[0], len(draws), dtype=torch.float64), torch.zeros(b.shape[0], len(draws), dtype=torch.float64)
    for s, (ia, ib) in enumerate(draws):
        ua[torch.from_numpy(ia), s] = 1.0
        ub[torch.from_numpy(ib), s] = 1.0
    k_aa, k_ab, k_bb = (torch.from_numpy(polynomial_kernel(x, y, degree)) for x, y in ((a, a), (a, b), (b, b)))
    xx = ((k_aa @ ua) * ua).sum(0) - k_aa.diagonal() @ ua
    yy = ((k_bb @ ub) * ub).sum(0) - k_bb.diagonal() @ ub
    xy = ((k_ab @ ub) * ua).sum(0)
    return ((xx + yy) / (m * (m - 1)) - 2 * xy / (m * m)).numpy()


# --------------------------------------------------------------------------- IS


def inception_score(logits, *, splits: int = IS_SPLITS, seed: int = 0,
                    shuffle: bool = True) -> tuple[float, float]:
    """Inception Score of class ``logits [N, K]`` (Salimans et al. 2016): per split,
    ``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y)`` the split's mean prediction; returns the
    mean and (population) std over ``splits`` contiguous splits of the rows, shuffled first
    with ``numpy.random.RandomState(seed)`` as torch-fidelity does. Lies in ``[1, K]``."""
    z = as_features(logits, "logits", min_rows=max(splits, 2))
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    n = z.shape[0]
    if shuffle:
        z = z[np.random.RandomState(seed).permutation(n)]
    log_p = z - z.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(0, keepdims=True)
        kl = (p[lo:hi] * (log_p[lo:hi] - np.log(q))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------- precision / recall


def _pairwise_distances(x: np.ndarray, y: np.ndarray, block: int = 2048):
    """Euclidean distances ``[len(x), len(y)]`` in row blocks (float64 torch)."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for i in range(0, xt.shape[0], block):
        yield i, torch.cdist(xt[i:i + block], yt)


def knn_radii(x: np.ndarray, k: int = PR_K) -> np.ndarray:
    """Distance from every row of ``x`` to its ``k``-th nearest other row of ``x``."""
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in [1, {x.shape[0] - 1}] for {x.shape[0]} points, got {k}")
    radii = np.empty(x.shape[0])
    for i, d in _pairwise_distances(x, x):
        radii[i:i + d.shape[0]] = d.kthvalue(k + 1, dim=1).values.numpy()  # the +1 is the point itself
    return radii


def manifold_coverage(points: np.ndarray, manifold: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of ``points`` inside the union of balls ``|p - m_j| <= radii[j]``."""
    r = torch.from_numpy(radii)
    inside = 0
    for _, d in _pairwise_distances(points, manifold):
        inside += int((d <= r).any(1).sum())
    return inside / points.shape[0]


def precision_recall(real, fake, *, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` features against
    ``real`` ones, with ``k``-nearest-neighbour manifolds. Both are in ``[0, 1]``; identical
    sets give ``(1, 1)``. The estimate depends on the set sizes: pass sets of equal size
    (:func:`rcfd.evaluation.panel.measure_features` subsamples the larger one)."""
    r, f = as_features(real, "real features", k + 1), as_features(fake, "fake features", k + 1)
    _same_width(r, f)
    precision = manifold_coverage(f, r, knn_radii(r, k))
    recall = manifold_coverage(r, f, knn_radii(f, k))
    return precision, recall
