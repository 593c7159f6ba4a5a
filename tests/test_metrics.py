"""rcfd.evaluation.metrics: FID, KID and IS against torch-fidelity on the same features (and,
end to end, on the same images through a registered extractor), precision/recall against a
brute-force implementation, FID against scipy's matrix square root; properties; bad inputs."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import (
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from rcfd.data import DatasetSpec, load_dataset, to_float
from rcfd.evaluation import metrics
from rcfd.evaluation.features import ClassifierExtractor
from rcfd.evaluation.metrics import (
    feature_statistics,
    fid,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)


def _features(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.RandomState(seed)
    mix = rng.randn(d, d) / np.sqrt(d)
    return (rng.randn(n, d) @ mix) * scale + shift


# --------------------------------------------------------------------------- FID


def _reference_fid(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("d", [1, 7, 33])
def test_frechet_distance_matches_sqrtm_reference(d):
    rng = np.random.RandomState(d)
    a, b = rng.randn(d, d), rng.randn(d, d)
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.randn(d), rng.randn(d)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_reference_fid(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
    assert got == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)


def test_frechet_distance_of_singular_covariances_and_bad_shapes():
    f1, f2 = _features(5, 9, 0), _features(6, 9, 1, shift=1)  # fewer samples than dims: rank-deficient
    got = fid(f1, f2)
    assert np.isfinite(got) and got >= 0
    assert got == pytest.approx(_reference_fid(*feature_statistics(f1), *feature_statistics(f2)), rel=1e-6)
    mu1, s1 = feature_statistics(f1)
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(mu1, s1, mu1[:3], s1)


@pytest.mark.parametrize("n1,n2,d", [(50, 80, 2), (123, 64, 17), (300, 300, 64)])
def test_fid_matches_torch_fidelity_on_the_same_features(n1, n2, d):
    f1, f2 = _features(n1, d, 0), _features(n2, d, 1, shift=0.3, scale=1.2)
    stats = [fid_features_to_statistics(torch.from_numpy(f)) for f in (f1, f2)]
    theirs = fid_statistics_to_metric(*stats, verbose=False)[torch_fidelity.KEY_METRIC_FID]
    assert fid(f1, f2) == pytest.approx(theirs, rel=1e-6, abs=1e-9)
    assert fid(torch.from_numpy(f1).float(), f2) == pytest.approx(theirs, rel=1e-4)  # float32 input too


def test_fid_of_identical_sets_is_zero_and_grows_with_a_shift():
    f = _features(200, 16, 3)
    assert abs(fid(f, f)) < 1e-9 * np.trace(np.cov(f, rowvar=False))
    assert fid(f, f + 0.5) == pytest.approx(16 * 0.25, rel=1e-9)  # a shift only moves the mean


# --------------------------------------------------------------------------- KID


def _brute_mmd2(x, y):
    """Unbiased MMD^2 with the cubic kernel, pair by pair in float64."""
    k = lambda a, b: (a @ b / x.shape[1] + 1) ** 3
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_of_whole_sets_matches_a_pair_by_pair_mmd():
    x, y = _features(12, 5, 0), _features(12, 5, 1, shift=0.4)
    mean, std = kid(x, y, subsets=3, subset_size=None)  # every subset is the whole set, permuted
    assert mean == pytest.approx(_brute_mmd2(x, y), rel=1e-10) and std < 1e-12


@pytest.mark.parametrize("n1,n2,size,subsets", [(60, 90, 50, 7), (200, 150, 150, 20), (31, 31, 31, 1)])
def test_kid_matches_torch_fidelity_on_the_same_features(n1, n2, size, subsets):
    f1, f2 = _features(n1, 8, 0), _features(n2, 8, 1, shift=0.2)
    theirs = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=subsets,
                                    kid_subset_size=size, rng_seed=5, verbose=False)
    mean, std = kid(f1, f2, subsets=subsets, subset_size=size, seed=5)
    assert mean == pytest.approx(theirs[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-9, abs=1e-12)
    assert std == pytest.approx(theirs[torch_fidelity.KEY_METRIC_KID_STD], rel=1e-7, abs=1e-12)


def test_kid_precomputed_kernels_equal_per_subset_kernels(monkeypatch):
    f1, f2 = _features(70, 6, 0), _features(40, 6, 1)
    full = kid(f1, f2, subsets=5, subset_size=30, seed=1)
    monkeypatch.setattr(metrics, "KID_FULL_KERNEL_MAX", 0)
    assert kid(f1, f2, subsets=5, subset_size=30, seed=1) == pytest.approx(full, rel=1e-10, abs=1e-14)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    a, b = _features(400, 8, 0), _features(400, 8, 1)
    same, _ = kid(a, b, subsets=20, subset_size=200)
    far, _ = kid(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 0.1 * far and far > 0


# --------------------------------------------------------------------------- IS


@pytest.mark.parametrize("n,k,splits", [(100, 10, 10), (57, 3, 4), (20, 7, 1)])
def test_inception_score_matches_torch_fidelity(n, k, splits):
    logits = np.random.RandomState(n).randn(n, k) * 3
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=True, rng_seed=9)
    mean, std = inception_score(logits, splits=splits, seed=9)
    assert mean == pytest.approx(theirs[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-10)
    assert std == pytest.approx(theirs[torch_fidelity.KEY_METRIC_ISC_STD], rel=1e-8, abs=1e-12)


def test_inception_score_bounds():
    assert inception_score(np.zeros((40, 5)), splits=4)[0] == pytest.approx(1.0)  # no information: 1
    confident = np.tile(np.eye(5) * 60, (8, 1))  # certain and balanced over 5 classes: 5
    assert inception_score(confident, splits=1)[0] == pytest.approx(5.0, rel=1e-9)


# --------------------------------------------------------------------------- precision / recall


def _brute_precision_recall(real, fake, k):
    def radii(x):
        return [sorted(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]

    def inside(points, manifold, r):
        return np.mean([any(np.linalg.norm(p - m) <= rm for m, rm in zip(manifold, r)) for p in points])

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


@pytest.mark.parametrize("n_real,n_fake,d,k", [(30, 30, 2, 3), (25, 41, 7, 3), (12, 9, 1, 1), (40, 33, 5, 5)])
def test_precision_recall_matches_brute_force(n_real, n_fake, d, k):
    real, fake = _features(n_real, d, 0), _features(n_fake, d, 1, shift=0.7, scale=0.6)
    got = precision_recall(real, fake, k=k)
    assert got == pytest.approx(_brute_precision_recall(real, fake, k), abs=1e-12)


def test_precision_recall_properties():
    real = _features(100, 4, 0)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    collapsed = real[:5].repeat(20, axis=0) + 1e-6 * _features(100, 4, 1)  # few modes: precise, no recall
    p, r = precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.3


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_say_what_to_do():
    good = _features(30, 4, 0)
    with pytest.raises(ValueError, match="NaN"):
        fid(good, np.full((30, 4), np.nan))
    with pytest.raises(ValueError, match="different widths"):
        kid(good, _features(30, 5, 1))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid(good[:1], good)
    with pytest.raises(ValueError, match="at least 10 samples"):
        inception_score(good[:9, :3])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        precision_recall(good.ravel(), good)
    with pytest.raises(ValueError, match="at least 6 samples"):
        precision_recall(good[:5], good[:5], k=5)
    with pytest.raises(ValueError, match="k must be"):
        metrics.knn_radii(good[:5], k=5)


# --------------------------------------------------------------------------- images, end to end


class TinyClassifier(torch.nn.Module):
    """float images in [-1, 1] -> (logits [B, 7], features [B, 24])."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.head = torch.nn.Linear(24, 7)

    def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 2).flatten(1)
        return 4 * self.head(f), f


class _TheirView(FeatureExtractorBase):
    """The same classifier registered with torch-fidelity."""

    net = None

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @classmethod
    def get_provided_features_list(cls):
        return ("24", "logits")

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric):
        return {"isc": "logits", "fid": "24", "kid": "24"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        logits, feats = type(self).net(to_float(x))
        out = {"24": feats, "logits": logits}
        return tuple(out[k] for k in self.features_list)


class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_our_numbers_equal_torch_fidelity_on_the_same_images():
    train, test = load_dataset(DatasetSpec(), "train").images[:400], load_dataset(DatasetSpec(), "test").images
    samples = test.flip(-1)[:250]  # mirrored digits: a real, moderate distance
    net = TinyClassifier().eval()
    _TheirView.net = net
    if "rcfd-test-tiny" not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor("rcfd-test-tiny", _TheirView)
    theirs = torch_fidelity.calculate_metrics(
        input1=_Images(samples), input2=_Images(train), fid=True, kid=True, isc=True, cuda=False,
        feature_extractor="rcfd-test-tiny", kid_subsets=10, kid_subset_size=200, rng_seed=3, verbose=False,
        save_cpu_ram=True, cache=False)
    ext = ClassifierExtractor(net, "tiny", (1, 16, 16))
    ours_s, ours_t = ext(samples, batch_size=64), ext(train, batch_size=100)
    assert fid(ours_s.features, ours_t.features) == pytest.approx(theirs[torch_fidelity.KEY_METRIC_FID], rel=1e-4)
    k = kid(ours_s.features, ours_t.features, subsets=10, subset_size=200, seed=3)[0]
    assert k == pytest.approx(theirs[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-4, abs=1e-7)
    isc = inception_score(ours_s.logits, seed=3)[0]
    assert isc == pytest.approx(theirs[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-5)
