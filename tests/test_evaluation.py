"""rcfd.evaluation: the extractors of the panel on tiny inputs, the panel built from names and
checkpoints, reference features computed once, every metric x split, the noise floors."""

import os
import pickle

import numpy as np
import pytest
import torch

from rcfd.io.checkpoint import load_classifier_checkpoint, make_checkpoint, save_checkpoint
from rcfd.core.classifiers import ClassifierConfig, build
from rcfd.data import DatasetSpec, ImageDataset, load_dataset, to_float
from rcfd.errors import CheckpointError, ConfigError, UsageError
from rcfd.evaluation import extractors as ex
from rcfd.evaluation import fidelity
from rcfd.evaluation.features import (
    ClassifierExtractor,
    Features,
    PixelExtractor,
    RandomConvExtractor,
    module_fingerprint,
    random_conv,
)
from rcfd.evaluation.metrics import fid
from rcfd.evaluation.panel import (
    References,
    data_floor,
    measure_features,
    measure_panel,
    panel_features,
)

SHAPE = (1, 16, 16)
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(6)
        self.head = torch.nn.Linear(24, 5)
        with torch.no_grad():  # non-trivial running statistics: eval mode must be used
            self.norm.running_mean.uniform_(-0.2, 0.2)

    def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.norm(self.conv(x))), 2).flatten(1)
        return self.head(f), f


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DatasetSpec(), "train"), load_dataset(DatasetSpec(), "test")


@pytest.fixture(scope="module")
def small(digits):
    """Small reference splits: quick to measure against."""
    train, test = digits
    return {"train": ImageDataset(train.images[:240], train.labels[:240], 10, "digits", "train"),
            "test": ImageDataset(test.images[:80], test.labels[:80], 10, "digits", "test")}


def _images(n, seed=0):
    return torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- extractors


def test_classifier_extractor_batches_snapshot_and_float64():
    net = TinyClassifier()
    ext = ClassifierExtractor(net, "tiny", SHAPE)
    images = _images(23)
    a, b = ext(images, batch_size=5), ext(images, batch_size=100)
    assert a.features.dtype == np.float64 and a.features.shape == (23, 24) and a.logits.shape == (23, 5)
    np.testing.assert_allclose(a.features, b.features, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        _, ref_feats = net.eval()(to_float(images))
    np.testing.assert_allclose(a.features, ref_feats.double().numpy(), rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        net.conv.weight.add_(1.0)  # the extractor measures with the weights it was given
    np.testing.assert_array_equal(ext(images).features, b.features)
    assert ext.detail == f"classifier:tiny:{ext.fingerprint[:12]}" and ext.name == "classifier"


def test_extractors_refuse_bad_images():
    ext = PixelExtractor(SHAPE)
    with pytest.raises(ValueError, match="uint8"):
        ext(torch.full((4, *SHAPE), float("nan")))
    with pytest.raises(ValueError, match=r"\[N, 1, 16, 16\]"):
        ext(torch.zeros(4, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least one image"):
        ext(torch.zeros(0, *SHAPE, dtype=torch.uint8))


def test_pixels_and_whitened_pca(digits):
    train = digits[0].images
    raw = PixelExtractor(SHAPE)(train[:7])
    np.testing.assert_array_equal(raw.features, to_float(train[:7]).double().flatten(1).numpy())
    assert raw.logits is None
    pca = PixelExtractor(SHAPE, pca_dims=12, fit_images=train)
    f = pca(train).features
    assert f.shape == (len(train), 12)
    np.testing.assert_allclose(f.mean(0), 0, atol=1e-8)
    np.testing.assert_allclose(np.cov(f, rowvar=False), np.eye(12), atol=1e-8)  # whitened on the fit set
    with pytest.raises(ValueError, match="pca_dims"):
        PixelExtractor(SHAPE, pca_dims=300, fit_images=train[:50])
    with pytest.raises(ValueError, match="fit_images"):
        PixelExtractor(SHAPE, pca_dims=4)


def test_random_conv_is_fixed_by_its_seed_and_standardised_on_the_fit_set(digits):
    torch.manual_seed(1)
    a = random_conv(1, seed=0)
    torch.manual_seed(2)
    b = random_conv(1, seed=0)
    assert module_fingerprint(a) == module_fingerprint(b) != module_fingerprint(random_conv(1, seed=1))
    train = digits[0].images[:300]
    ext = RandomConvExtractor(SHAPE, fit_images=train)
    f = ext(train).features
    assert f.shape == (300, 32 + 64 + 128) and f.var(0, ddof=1).mean() == pytest.approx(1.0, rel=1e-9)
    np.testing.assert_allclose(f.mean(0), 0, atol=1e-9)  # centred on the fit set
    raw = random_conv(1)(to_float(train)).double().numpy()  # one affine map of the raw features
    np.testing.assert_allclose(f, (raw - raw.mean(0)) / np.sqrt(raw.var(0, ddof=1).mean()), rtol=1e-4, atol=1e-4)
    assert RandomConvExtractor(SHAPE, fit_images=train).fingerprint == ext.fingerprint
    assert RandomConvExtractor(SHAPE).fingerprint != ext.fingerprint  # another scale, another cache name
    odd = RandomConvExtractor((3, 7, 7))  # any channels and size
    assert odd(torch.zeros(3, 3, 7, 7, dtype=torch.uint8)).features.shape == (3, 224)


# --------------------------------------------------------------------------- the panel from names


def _classifier_ckpt(path, seed):
    torch.manual_seed(seed)
    config = ClassifierConfig(name="resnet18", num_classes=10, in_channels=1, width=4)
    model = build(config)
    save_checkpoint(make_checkpoint("classifier", config.to_dict(), model.state_dict()), path)
    return model


def test_classifier_from_checkpoints_and_the_circularity_check(tmp_path):
    model = _classifier_ckpt(tmp_path / "eval.pt", 0)
    _classifier_ckpt(tmp_path / "distill.pt", 1)
    ext = ex.classifier_extractor(tmp_path / "eval.pt", SHAPE, distillation=tmp_path / "distill.pt")
    assert ext.fingerprint == module_fingerprint(model) and ext.detail.startswith("classifier:resnet18:")
    with pytest.raises(UsageError, match="circular"):
        ex.classifier_extractor(tmp_path / "eval.pt", SHAPE, distillation=tmp_path / "eval.pt")
    torch.save({"model": model.state_dict()}, tmp_path / "ref.pt")  # a reference file: no architecture
    with pytest.raises(UsageError, match="architecture"):
        load_classifier_checkpoint(tmp_path / "ref.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UsageError, match="takes 1-channel images, the data has 3"):
        ex.classifier_extractor(tmp_path / "eval.pt", (3, 16, 16))


def test_panel_names_and_availability(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    assert ex.panel_names() == ex.DEFAULT_EXTRACTORS
    assert ex.panel_names(["pixels", "inception"], "never") == ("pixels",)
    with pytest.raises(ConfigError, match="distinct names"):
        ex.panel_names(["pixels", "pixels"])
    with pytest.raises(ConfigError, match="distinct names"):
        ex.panel_names(["vgg"])
    assert "inception" in ex.panel_names(["pixels"], "always")  # asked for: checked below
    with pytest.raises(UsageError, match="not on this machine|needs its weights"):
        ex.check_extractors_available(["inception"], classifier=None)
    with pytest.raises(UsageError, match="eval_classifier"):
        ex.check_extractors_available(["classifier", "pixels"], classifier=None)
    with pytest.raises(UsageError, match="does not exist"):
        ex.check_extractors_available(["classifier"], classifier=tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="primary"):
        ex.check_extractors_available(["pixels"], classifier=None, primary="classifier")
    said = ex.check_extractors_available(["classifier", "random-conv", "pca"], classifier=True)
    assert list(said) == ["classifier", "random-conv", "pca"] and "not the distillation" in said["classifier"]
    weights = tmp_path / "torch_home" / "hub" / "checkpoints" / fidelity.INCEPTION_FILE
    weights.parent.mkdir(parents=True)
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "fc.weight": torch.zeros(1008, 2048)}, weights)
    assert ex.panel_names(["pixels"]) == ("pixels", "inception")  # auto: found, added
    assert str(weights) in ex.check_extractors_available(["inception"], classifier=None)["inception"]


def test_build_panel_in_order(tmp_path, digits):
    _classifier_ckpt(tmp_path / "eval.pt", 0)
    panel = ex.build_panel(["pixels", "classifier", "random-conv", "pca"], SHAPE, train_images=digits[0].images,
                           classifier=tmp_path / "eval.pt")
    assert [e.name for e in panel] == ["pixels", "classifier", "random-conv", "pca"]
    with pytest.raises(UsageError, match="train_images"):
        ex.build_panel(["pca"], SHAPE)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_inception_weights_are_checked_unrun_and_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("network"))
    assert fidelity.find_inception_weights() is None
    with pytest.raises(UsageError, match="nothing is downloaded"):
        fidelity.InceptionExtractor()
    with pytest.raises(UsageError, match="does not exist"):
        fidelity.find_inception_weights(tmp_path / "nope.pth")
    bad, marker = tmp_path / "evil.pth", tmp_path / "ran"
    torch.save({"fc.weight": _Payload(str(marker))}, bad)
    with pytest.raises(UsageError, match="refusing to load"):
        fidelity.InceptionExtractor(bad)
    assert not marker.exists()
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(10, 3)}, wrong)
    with pytest.raises(UsageError, match="not torch-fidelity's Inception"):
        fidelity.InceptionExtractor(wrong)


@pytest.mark.slow
def test_inception_extractor_end_to_end_on_grayscale(tmp_path, monkeypatch):
    """torch-fidelity's Inception with random weights (the real ones cannot be fetched here):
    one-channel images are replicated to three, 2048 features and 1008 logits come out."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as m:
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    weights = tmp_path / fidelity.INCEPTION_FILE
    torch.save(net.state_dict(), weights)
    ext = fidelity.InceptionExtractor(weights)
    out = ext(_images(3), batch_size=2)
    assert out.features.shape == (3, 2048) and out.logits.shape == (3, 1008) and ext.name == "inception"


# --------------------------------------------------------------------------- measuring


def test_references_are_computed_once_and_cached_by_fingerprint(small, tmp_path):
    calls = []

    class Counting(PixelExtractor):
        def batch(self, images):
            calls.append(images.shape[0])
            return super().batch(images)

    ext = Counting(SHAPE)
    refs = References(small, cache_dir=tmp_path)
    first = refs.features(ext, "train")
    assert refs.features(ext, "train") is first and calls == [240]
    assert len(list(tmp_path.glob("train-*-pixels-*.npz"))) == 1
    again = References(small, cache_dir=tmp_path).features(ext, "train")  # a new process: from the file
    np.testing.assert_array_equal(again.features, first.features) and calls == [240]
    assert refs.counts == {"train": 240, "test": 80} and refs.splits == ("test", "train")
    with pytest.raises(UsageError, match="train at least"):
        References({"test": small["test"]})


def test_measure_features_properties():
    rng = np.random.RandomState(0)
    real = Features(rng.randn(90, 6))
    same = measure_features(real, real)
    assert abs(same["fid"]) < 1e-9 and same["precision"] == same["recall"] == 1.0
    far = measure_features(Features(real.features + 50), real)
    assert far["precision"] == far["recall"] == 0.0 and far["fid"] > 1000 and far["kid"] > 0
    big = Features(rng.randn(400, 6))  # P/R on equal counts: the bigger set cut into subsets of 90
    m = measure_features(big, real)
    assert 0.5 < m["precision"] <= 1 and 0.5 < m["recall"] <= 1
    with pytest.raises(ValueError, match="same extractor"):
        measure_features(Features(rng.randn(90, 5)), real)


def test_measure_panel_against_both_splits(small):
    refs = References(small)
    panel = [PixelExtractor(SHAPE), ClassifierExtractor(TinyClassifier(), "tiny", SHAPE)]
    samples = small["test"].images.flip(-1)
    feats = panel_features(samples, panel)
    m = measure_panel(feats, panel, refs)
    assert set(m) == {"pixels", "classifier"} and set(m["pixels"]) == {"test", "train", "is", "is_std"}
    assert m["pixels"]["is"] is None and 1 <= m["classifier"]["is"] <= 5
    direct = fid(feats["pixels"].features, refs.features(panel[0], "test").features)
    assert m["pixels"]["test"]["fid"] == pytest.approx(direct, rel=1e-12)
    floor = data_floor(panel, refs)
    assert floor["num"] == {"test": 80, "train": 240}
    assert floor["metrics"]["pixels"]["fid"] < m["pixels"]["train"]["fid"]  # real images beat mirrored ones
    with pytest.raises(UsageError, match="at least 20 samples"):
        panel_features(samples[:19], panel)


def test_a_malicious_inception_weights_file_is_refused_without_dangerous_advice(tmp_path):
    """A file given as the Inception weights that would run code is refused, nothing runs,
    and the message never suggests loading it with weights_only=False."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UsageError, match="refusing to load") as e:
        fidelity.check_inception_weights(str(path))
    assert "weights_only=False" not in str(e.value) and not marker.exists()
