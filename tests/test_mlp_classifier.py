"""The MLP classifier: a second trained judge in the panel (``mlp-classifier``), built and
trained differently from the distillation classifier: the network against a float64
reference, its classifier-stage defaults, training it with its input size from the data, its
record in ``classifiers`` and its place in the panel."""

import json

import pytest
import torch
import torch.nn.functional as F

import rcfd
from rcfd.cli import evaluate as evaluate_cli
from rcfd.core.classifiers import ClassifierConfig, MLPClassifier, build
from rcfd.data import DatasetSpec, load_dataset
from rcfd.errors import UsageError
from rcfd.evaluation import extractors as ex
from rcfd.core.unet import UNet, UNetConfig
from rcfd.io.checkpoint import (
    load_classifier_checkpoint,
    make_checkpoint,
    save_checkpoint,
    save_diffusion_checkpoint,
)
from rcfd.methods.classifier import (
    ClassifierStageConfig,
    default_mlp_classifier,
    run_classifiers,
    train_classifier,
)
from rcfd.report.stats import CLASSIFIER_FEATURES, extractor_family
from rcfd.study.presets import get_preset
from rcfd.training.rundir import RunContext

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mlp_matches_a_float64_reference_and_returns_its_penultimate_layer():
    torch.manual_seed(0)
    config = ClassifierConfig(name="mlp", num_classes=10, in_channels=3, width=16, input_size=6)
    model = build(config).double().eval()
    assert isinstance(model, MLPClassifier) and config.feature_dim == 16 and model.feature_dim == 16
    x = torch.rand(5, 3, 6, 6, dtype=torch.float64) * 2 - 1
    logits, feats = model(x)
    mean = torch.tensor(config.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float64).view(1, 3, 1, 1)
    h = ((x + 1) / 2 - mean) / std  # CIFAR normalisation for 3 channels
    h = F.relu(h.flatten(1) @ model.hidden1.weight.T + model.hidden1.bias)
    ref_feats = F.relu(h @ model.hidden2.weight.T + model.hidden2.bias)
    torch.testing.assert_close(feats, ref_feats, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits, ref_feats @ model.fc.weight.T + model.fc.bias, rtol=0, atol=1e-12)
    assert (feats >= 0).all() and feats.shape == (5, 16)
    with pytest.raises(ValueError, match="takes 6x6 images"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    assert ClassifierConfig(name="mlp").width == 256  # the default hidden width


def test_default_mlp_section_differs_from_the_distillation_classifier_in_every_respect():
    mlp, distill = default_mlp_classifier(), ClassifierStageConfig()
    assert mlp.role == "mlp" and mlp.arch == "mlp" and distill.arch != "mlp"
    assert (mlp.optimizer, distill.optimizer) == ("adam", "sgd")
    assert mlp.crop and mlp.crop_padding == 1 and mlp.pad_fill == "background"  # +-1 pixel shifts
    assert not (mlp.flip or mlp.autoaugment or mlp.cutout) and distill.autoaugment and distill.cutout
    cfg = get_preset("digits")
    assert mlp.seed_offset not in (cfg.distill_classifier.seed_offset, cfg.eval_classifier.seed_offset)
    assert cfg.mlp_classifier == mlp and cfg.eval.extractors[:2] == ("classifier", "mlp-classifier")
    with pytest.raises(Exception, match="mlp_classifier equals distill_classifier"):
        cfg.with_overrides({"mlp_classifier": cfg.distill_classifier.replace(role="mlp").to_dict()})
    assert extractor_family("mlp-classifier") == CLASSIFIER_FEATURES


@pytest.mark.parametrize("size,channels", [(8, 1), (12, 3)])
def test_trained_mlp_takes_its_input_size_from_the_data_and_is_recorded(tmp_path, size, channels):
    spec = DatasetSpec(image_size=size, channels=channels)  # 3 channels: as on CIFAR-10
    cfg = default_mlp_classifier().replace(steps=300, eval_interval=100, width=32)
    path = train_classifier(cfg, spec, RunContext(tmp_path, device="cpu", seed=0, progress=False))
    assert path == tmp_path / "classifier" / "mlp.safetensors"
    model = load_classifier_checkpoint(path)
    assert isinstance(model, MLPClassifier) and model.config.input_size == size
    assert model.hidden1.in_features == channels * size * size and model.config.in_channels == channels
    test = load_dataset(spec, "test")
    logits, feats = model(test.to_float()[:4])
    assert logits.shape == (4, 10) and feats.shape == (4, 32)
    record = run_classifiers(mlp=path)["mlp"]
    assert record["role"] == "mlp" and record["extractor"] == "mlp-classifier" and record["arch"] == "mlp"
    assert record["steps"] == 300 and 0.6 < record["test_accuracy"] <= 1 and 0.6 < record["val_accuracy"] <= 1


def _save(path, name, seed, **kw):
    torch.manual_seed(seed)
    config = ClassifierConfig(name=name, num_classes=10, in_channels=1, **kw)
    save_checkpoint(make_checkpoint("classifier", config.to_dict(), build(config).state_dict()), path)


def test_mlp_classifier_in_the_panel(tmp_path):
    shape = (1, 8, 8)
    _save(tmp_path / "mlp.pt", "mlp", 0, width=8, input_size=8)
    _save(tmp_path / "eval.pt", "resnet18", 1, width=4)
    panel = ex.build_panel(["classifier", "mlp-classifier", "pixels"], shape, classifier=tmp_path / "eval.pt",
                           mlp_classifier=tmp_path / "mlp.pt")
    assert [e.name for e in panel] == ["classifier", "mlp-classifier", "pixels"]
    assert panel[1].detail.startswith("classifier:mlp:")
    feats = panel[1](torch.randint(0, 256, (3, *shape), dtype=torch.uint8))
    assert feats.features.shape == (3, 8) and feats.logits.shape == (3, 10)
    with pytest.raises(UsageError, match="'mlp-classifier' extractor needs an MLP classifier.*mlp_classifier"):
        ex.check_extractors_available(["mlp-classifier"], classifier=None)
    with pytest.raises(UsageError, match="does not exist"):
        ex.check_extractors_available(["mlp-classifier"], classifier=None, mlp_classifier=tmp_path / "no.pt")
    said = ex.check_extractors_available(["mlp-classifier"], classifier=None, mlp_classifier=True)
    assert "MLP" in said["mlp-classifier"]
    with pytest.raises(UsageError, match="circular"):
        ex.build_panel(["mlp-classifier"], shape, mlp_classifier=tmp_path / "mlp.pt",
                       distillation_classifier=tmp_path / "mlp.pt")


def test_evaluate_cli_measures_with_mlp_classifier(tmp_path, capsys):
    torch.manual_seed(0)
    unet = UNet(UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1,), attn=(), num_res_blocks=1,
                           num_time_indices=3, dropout=0.0))
    ckpt = save_diffusion_checkpoint(tmp_path / "model.pt", unet, T=2, time_scale=1)
    _save(tmp_path / "mlp.pt", "mlp", 0, width=8, input_size=8)
    out = tmp_path / "r.json"
    code = evaluate_cli.main([str(ckpt), "--steps", "1", "--num-samples", "20", "--batch-size", "20",
                              "--data", "digits", "--image-size", "8", "--mlp-classifier", str(tmp_path / "mlp.pt"),
                              "--json", str(out), "--no-progress", "--device", "cpu"])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "[mlp-classifier] vs test FID" in text.out
    assert "mlp-classifier" in json.loads(out.read_text())["extractors"]
    assert evaluate_cli.main([str(ckpt), "--data", "digits", "--image-size", "8", "--extractor", "mlp-classifier",
                              "--device", "cpu"]) == 2
    assert "needs an MLP classifier" in capsys.readouterr().err


def test_api_measure_with_mlp_classifier(tmp_path):
    _save(tmp_path / "mlp.pt", "mlp", 0, width=8, input_size=8)
    images = load_dataset(DatasetSpec(image_size=8), "test").images[:40]
    m = rcfd.measure(images, "digits", ["mlp-classifier"], mlp_classifier=tmp_path / "mlp.pt")
    assert set(m) == {"mlp-classifier"} and m["mlp-classifier"]["test"]["fid"] >= 0
    assert m["mlp-classifier"]["is"] is not None  # it has logits
