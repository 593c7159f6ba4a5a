"""rcfd.metrics: torch-fidelity IS / FID / KID from samples or a sampler, checked against an
independent float64 FID on the same features; extractor choice without any network."""

import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

from rcfd.data import DatasetSpec, ImageDataset, load_dataset, to_float
from rcfd.metrics import (
    INCEPTION_FILE,
    choose_extractor,
    classifier_extractor,
    evaluate,
    feature_statistics,
    find_inception_weights,
    frechet_distance,
    inception_extractor,
    module_fingerprint,
)


class TinyClassifier(nn.Module):
    """A classifier-shaped net: float images in [-1, 1] -> (logits [B, K], features [B, D])."""

    def __init__(self, channels=1, num_classes=7, width=6):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)
        self.head = nn.Linear(width * 4, num_classes)
        with torch.no_grad():  # non-trivial running statistics: eval mode must be used
            self.norm.running_mean.uniform_(-0.2, 0.2)
            self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x):
        f = nn.functional.adaptive_avg_pool2d(torch.tanh(self.norm(self.conv(x))), 2).flatten(1)
        return 4 * self.head(f), f


@pytest.fixture(scope="module")
def digits():
    train, test = load_dataset(DatasetSpec(), "train"), load_dataset(DatasetSpec(), "test")
    return ImageDataset(train.images[:400], train.labels[:400], 10, "digits", "train"), test


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty torch hub cache, and any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def refuse(*a, **k):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILE


def _outputs(net, images):
    """(logits, features) of the net in eval mode, float64."""
    with torch.no_grad():
        logits, feats = net.eval()(to_float(images))
    return logits.double(), feats.double()


def _features(net, images):
    return _outputs(net, images)[1]


# --------------------------------------------------------------------------- Frechet distance


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
    rng = np.random.RandomState(0)
    f1, f2 = rng.randn(5, 9), rng.randn(6, 9) + 1  # fewer samples than dims: rank-deficient
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got >= 0
    assert got == pytest.approx(_reference_fid(mu1, s1, mu2, s2), rel=1e-6)
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(mu1, s1, mu2[:3], s2)


# --------------------------------------------------------------------------- torch-fidelity


def test_fid_matches_independent_fid_on_the_same_features(digits, capsys):
    reference, test = digits
    net = TinyClassifier()
    ext = classifier_extractor(net, "tiny", (1, 16, 16))
    samples = test.images.flip(-1)[:250]  # mirrored digits: a real, moderate distance
    r = evaluate(samples, reference, ext, kid_subset_size=200)
    ours = frechet_distance(*feature_statistics(_features(net, samples)),
                            *feature_statistics(_features(net, reference.images)))
    assert r["fid"] == pytest.approx(ours, rel=1e-5) and ours > 0
    assert 1 <= r["isc_mean"] <= 7 and r["isc_std"] >= 0  # IS lies in [1, number of classes]
    # IS, one split: exp(E_x KL(p(y|x) || p(y))) from the same logits
    p = _outputs(net, samples)[0].softmax(1)
    ours_is = float(torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()))
    one = evaluate(samples, reference, ext, fid=False, kid=False, isc_splits=1)
    assert one["isc_mean"] == pytest.approx(ours_is, rel=1e-5) and set(one) & {"fid", "kid_mean"} == set()
    assert np.isfinite(r["kid_mean"]) and r["kid_std"] >= 0
    fp = module_fingerprint(net)[:12]
    assert r["extractor"] == f"classifier:tiny:{fp}" and r["num_samples"] == 250
    assert f"extractor classifier:tiny:{fp}" in capsys.readouterr().out


def test_sampler_input_and_reference_cache(digits, tmp_path):
    reference, _ = digits
    net = TinyClassifier(num_classes=4)
    ext = classifier_extractor(net, "tiny", (1, 16, 16))
    produced = []

    def generate(x_T):  # a "sampler": float images in [-1, 1] from its x_T
        assert x_T.shape[1:] == (1, 16, 16)
        x = torch.tanh(x_T + to_float(reference.images[: x_T.shape[0]]))
        produced.append(x)
        return x

    r1 = evaluate(generate, reference, ext, num_samples=90, batch_size=32, run_dir=str(tmp_path), isc=False)
    images = torch.cat(produced)
    assert images.shape[0] == 90 and [p.shape[0] for p in produced] == [32, 32, 26]
    from rcfd.data import to_uint8

    ours = frechet_distance(*feature_statistics(_features(net, to_uint8(images))),
                            *feature_statistics(_features(net, reference.images)))
    assert r1["fid"] == pytest.approx(ours, rel=1e-5) and "isc_mean" not in r1
    cached = os.listdir(tmp_path / "fidelity_cache")
    assert cached and all(n.startswith(r1["reference"]) and ext.registry_name in n for n in cached)
    produced.clear()
    r2 = evaluate(generate, reference, ext, num_samples=90, batch_size=32, run_dir=str(tmp_path), isc=False)
    assert r2["fid"] == r1["fid"] and r2["kid_mean"] == r1["kid_mean"]  # same seed, same x_T
    assert torch.equal(torch.cat(produced), images)


def test_identical_sets_have_zero_fid(digits):
    reference, _ = digits
    ext = classifier_extractor(TinyClassifier(), "tiny", (1, 16, 16))
    r = evaluate(reference.images, reference, ext, isc=False, kid=False)
    assert abs(r["fid"]) < 1e-6 and set(r) >= {"fid", "extractor", "num_samples"}


def test_rgb_classifier_and_bad_samples(digits):
    reference, _ = digits
    rgb = ImageDataset(reference.images.expand(-1, 3, -1, -1).contiguous(), None, 0, "rgb", "train")
    net = TinyClassifier(channels=3)
    ext = classifier_extractor(net, "tiny3", (3, 16, 16))
    r = evaluate(to_float(rgb.images[:50]), rgb, ext, isc=False, kid=False)
    assert np.isfinite(r["fid"]) and r["extractor"].startswith("classifier:tiny3:")
    with pytest.raises(ValueError, match=r"samples must be \[B, 3, 16, 16\]"):
        evaluate(reference.images[:50], rgb, ext)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(torch.full((20, 3, 16, 16), float("nan")), rgb, ext)
    with pytest.raises(ValueError, match="num_samples"):
        evaluate(lambda z: z, rgb, ext)
    with pytest.raises(ValueError, match="circular"):
        classifier_extractor(net, "tiny3", (3, 16, 16), distillation_fingerprint=module_fingerprint(net))


# --------------------------------------------------------------------------- extractor choice


def test_without_inception_weights_nothing_is_downloaded(no_network, caplog):
    assert find_inception_weights() is None
    with pytest.raises(FileNotFoundError, match="Inception weights are not here"):
        choose_extractor()
    with pytest.raises(FileNotFoundError, match="not on this machine"):
        choose_extractor(prefer="inception")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        choose_extractor(inception_weights=str(no_network.parent / "nope.pth"))
    net = TinyClassifier()
    with caplog.at_level("WARNING", logger="rcfd"):
        ext = choose_extractor(classifier=net, arch="resnet18", image_shape=(1, 16, 16))
    assert ext.label == f"classifier:resnet18:{module_fingerprint(net)[:12]}"
    assert "not comparable" in caplog.text and str(no_network) in caplog.text


def test_inception_weights_in_the_hub_cache_are_found_and_checked(no_network, tmp_path):
    no_network.parent.mkdir(parents=True)
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "fc.weight": torch.zeros(1008, 2048)}, no_network)
    assert find_inception_weights() == str(no_network)
    ext = choose_extractor(classifier=TinyClassifier(), image_shape=(1, 16, 16))
    assert ext.label == "inception-v3-compat" and ext.weights_path == str(no_network) and ext.channels == 3
    assert choose_extractor(prefer="classifier", classifier=TinyClassifier(), image_shape=(1, 16, 16)).label.startswith(
        "classifier:")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(10, 3)}, wrong)
    with pytest.raises(ValueError, match="not torch-fidelity's Inception weights"):
        inception_extractor(str(wrong))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_inception_file_is_refused_unrun(no_network, tmp_path):
    bad, marker = tmp_path / "evil.pth", tmp_path / "ran"
    torch.save({"fc.weight": _Payload(str(marker))}, bad)  # a checkpoint that runs code when unpickled
    with pytest.raises(ValueError, match="not a loadable weights file"):
        inception_extractor(str(bad))
    assert not marker.exists()


@pytest.mark.slow
def test_inception_path_end_to_end_on_grayscale(digits, no_network, tmp_path, monkeypatch):
    """torch-fidelity's Inception with random weights (the real ones cannot be fetched
    here): 1-channel digits are replicated to RGB and the number carries the right name."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as m:
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    weights = tmp_path / INCEPTION_FILE
    torch.save(net.state_dict(), weights)
    reference, test = digits
    ext = choose_extractor(inception_weights=str(weights))
    r = evaluate(test.images[:10], ImageDataset(reference.images[:10], None, 0, "digits", "train"), ext,
                 isc_splits=2, kid_subset_size=8, batch_size=10)
    assert r["extractor"] == "inception-v3-compat" and np.isfinite(r["fid"]) and r["isc_mean"] >= 1


@pytest.mark.cuda
def test_evaluate_on_cuda_matches_cpu(digits):
    reference, test = digits
    ext = classifier_extractor(TinyClassifier(), "tiny", (1, 16, 16))
    cpu = evaluate(test.images[:100], reference, ext, isc=False, kid=False)
    gpu = evaluate(lambda z: to_float(test.images[: z.shape[0]]).to(z.device), reference, ext, num_samples=100,
                   batch_size=100, isc=False, kid=False, device="cuda")
    assert gpu["fid"] == pytest.approx(cpu["fid"], rel=1e-3, abs=1e-4)
