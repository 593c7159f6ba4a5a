import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference_keys import read_reference_keys
from rcfd.core.classifiers import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CLASSIFIER_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassifierConfig,
    FrozenClassifier,
    build,
    build_classifier,
    frozen,
    load_reference_classifier,
)
from rcfd.core.imagenet import _imagenet_state_dict

def reference_keys(name):
    return read_reference_keys(name)[0]


def images(b, c, h, w=None, dtype=torch.float32):
    return torch.rand(b, c, h, w or h, dtype=dtype) * 2 - 1


def randomize_bn(model):
    """Non-trivial running statistics, so eval-mode outputs depend on them."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("name,width,c,hw,b", [
    ("resnet18", 64, 3, 32, 2), ("resnet34", 8, 3, 32, 3), ("resnet50", 64, 3, 32, 2),
    ("densenet121", 8, 3, 32, 2), ("densenet201", 32, 3, 32, 2),
    ("resnet18", 16, 1, 16, 7), ("densenet_small", None, 1, 16, 5), ("resnet50", 4, 1, 13, 3),
])
def test_outputs_and_feature_width(name, width, c, hw, b):
    model = build_classifier(name, num_classes=7, in_channels=c, width=width).eval()
    with torch.no_grad():
        logits, features = model(images(b, c, hw))
    assert logits.shape == (b, 7) and model.num_classes == 7
    assert features.shape == (b, model.feature_dim) == (b, model.config.feature_dim)
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()
    # features are the pooled activations the final linear layer reads
    torch.testing.assert_close(logits, model.fc(features))
    if name.startswith("resnet") or name.startswith("densenet"):
        assert (features >= 0).all()  # averages of ReLU outputs


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048),
                                      ("densenet121", 1024), ("densenet201", 1920)])
def test_reference_feature_widths(name, dim):
    assert ClassifierConfig(name=name).feature_dim == dim  # METHOD.md / standard architectures


def test_width_scales_resnet_features():
    for w in (4, 16):
        assert ClassifierConfig(name="resnet18", width=w).feature_dim == 8 * w
        assert ClassifierConfig(name="resnet50", width=w).feature_dim == 32 * w


def test_wrong_channels_is_a_clear_error():
    model = build_classifier("resnet18", in_channels=1, width=4)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        model(images(2, 3, 16))


# ------------------------------------------------------ reference layouts


@pytest.mark.parametrize("name", ["resnet18", "densenet201"])
def test_state_dict_layout_matches_reference(name):
    model = build_classifier(name)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == reference_keys(name)
    assert not any("input_mean" in k or "input_std" in k for k, _ in ours)


@pytest.mark.parametrize("name", ["resnet18", "densenet201"])
def test_reference_checkpoint_loads_and_matches(name, tmp_path):
    source = randomize_bn(build_classifier(name)).eval()
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    loaded = load_reference_classifier(ckpt, name).eval()
    assert loaded.config.mean == CIFAR10_MEAN and loaded.config.std == CIFAR10_STD
    assert (loaded.config.num_classes, loaded.config.in_channels) == (10, 3)
    x = images(2, 3, 32)
    with torch.no_grad():
        for a, b in zip(source(x), loaded(x)):
            assert torch.equal(a, b)


def test_reference_import_reads_shapes_and_normalisation():
    source = build_classifier("resnet18", num_classes=5, in_channels=1, width=8)
    source = randomize_bn(source).eval()
    sd = {f"module.{k}": v for k, v in source.state_dict().items()}  # DataParallel prefix
    loaded = load_reference_classifier(sd, "resnet18", normalization=((0.5,), (0.25,))).eval()
    assert (loaded.num_classes, loaded.in_channels, loaded.config.width) == (5, 1, 8)
    assert loaded.config.mean == (0.5,) and loaded.config.std == (0.25,)
    with pytest.raises(ValueError, match="missing"):
        load_reference_classifier({"model": {"fc.weight": torch.zeros(10, 4)}}, "densenet201")
    bad = dict(source.state_dict())
    bad.pop("layer1.0.bn1.bias")
    with pytest.raises(ValueError, match="does not match"):
        load_reference_classifier({"model": bad}, "resnet18", normalization=((0.5,), (0.5,)))
    with pytest.raises(ValueError, match="mean must have 1 entry"):  # CIFAR default is RGB
        load_reference_classifier(sd, "resnet18")


# ------------------------------------------------------------ normalisation


def test_normalisation_matches_manual_computation_float64():
    mean, std = (0.3, 0.6, 0.45), (0.2, 0.35, 0.27)
    a = build_classifier("resnet18", width=4, normalization=(mean, std))
    a = randomize_bn(a).double().eval()
    # identical weights, identity normalisation on [-1, 1]: ((x + 1) / 2 - 0.5) / 0.5 == x
    b = build_classifier("resnet18", width=4, normalization=((0.5,), (0.5,))).double().eval()
    b.load_state_dict(a.state_dict())
    x = images(3, 3, 11, 9, dtype=torch.float64)
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    manual = ((x + 1) / 2 - m) / s
    torch.testing.assert_close(a.normalize(x), manual, rtol=1e-15, atol=1e-15)
    with torch.no_grad():
        for out_a, out_b in zip(a(x), b(manual)):
            torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-12)


def test_normalisation_buffers_follow_device_and_dtype_but_not_state_dict():
    model = build_classifier("densenet_small", in_channels=1, width=4).half()
    assert model.input_mean.dtype == torch.float16
    assert "input_mean" not in model.state_dict() and "input_mean" in dict(model.named_buffers())


def test_default_normalisations():
    assert ClassifierConfig(name="resnet18").mean == CIFAR10_MEAN
    one = ClassifierConfig(name="resnet18", in_channels=1)
    assert one.mean == (0.5,) and one.std == (0.5,)
    imnet = ClassifierConfig(name="imagenet_resnet50", in_channels=1, pretrained=False)
    assert (imnet.mean, imnet.std, imnet.num_classes) == (IMAGENET_MEAN, IMAGENET_STD, 1000)


# ------------------------------------------------------------------ config


def test_config_json_round_trip():
    cfg = ClassifierConfig(name="densenet_small", num_classes=10, in_channels=1, width=6,
                           mean=(0.2,), std=(0.3,))
    back = ClassifierConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and build(back).config == cfg
    for name in CLASSIFIER_NAMES:
        c = ClassifierConfig(name=name, pretrained=False)
        assert ClassifierConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "vgg16"}, "(?s)name.*'resnet18'.*'densenet201'"),
    ({"num_classes": 0}, "num_classes"),
    ({"in_channels": 2, "mean": (0.5, 0.5, 0.5)}, "mean must have 1 or 2"),
    ({"std": (0.0,)}, "(?s)std.*greater than 0"),
    ({"width": -3}, "width"),
    ({"name": "imagenet_resnet50", "num_classes": 10}, "1000"),
    ({"name": "imagenet_densenet201", "in_channels": 2}, "1- or 3-channel"),
])
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassifierConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="depth: unknown key.*valid keys there: name"):
        ClassifierConfig.from_dict({"name": "resnet18", "depth": 18})


# ----------------------------------------------------------------- frozen


def test_frozen_classifier_for_distillation():
    classifier = build_classifier("resnet18", in_channels=1, width=4)
    classifier.train()
    with torch.no_grad():  # a few training batches so the running stats are not the init
        for _ in range(2):
            classifier(images(8, 1, 16))
    parent = nn.Module()
    parent.student = nn.Conv2d(1, 1, 3, padding=1)
    parent.classifier = frozen(classifier)
    parent.train()
    assert not parent.classifier.training and not any(m.training for m in classifier.modules())
    assert parent.student.training
    stats = {k: v.clone() for k, v in classifier.state_dict().items()}

    x = images(4, 1, 16).requires_grad_(True)
    logits, features = parent.classifier(parent.student(x))
    (features.square().mean() + logits.logsumexp(1).mean()).backward()
    assert all(p.grad is None and not p.requires_grad for p in classifier.parameters())
    assert parent.student.weight.grad is not None and parent.student.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    for k, v in classifier.state_dict().items():
        assert torch.equal(v, stats[k]), f"{k} changed in a training step"
    assert parent.classifier.feature_dim == classifier.feature_dim == 8 * 4
    assert parent.classifier.num_classes == 10
    assert frozen(parent.classifier) is parent.classifier


def test_frozen_forward_equals_eval_forward():
    classifier = randomize_bn(build_classifier("densenet_small", in_channels=1, width=4))
    wrapped = frozen(classifier)
    wrapped.train(True)
    x = images(3, 1, 16)
    with torch.no_grad():
        out = wrapped(x)
        ref = classifier.eval()(x)
    assert isinstance(wrapped, FrozenClassifier)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- ImageNet


def _capture_input(module):
    seen = {}
    module.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
    return seen


@pytest.mark.parametrize("name,stem,dim,c", [
    ("imagenet_resnet50", "conv1", 2048, 3),
    ("imagenet_densenet201", "features.conv0", 1920, 1),
])
def test_imagenet_wrapper_resizes_and_normalises(name, stem, dim, c):
    model = build_classifier(name, in_channels=c, pretrained=False).eval()
    seen = _capture_input(model.net.get_submodule(stem))
    x = images(1, c, 17, 13)
    with torch.no_grad():
        logits, features = model(x)
    assert logits.shape == (1, 1000) and features.shape == (1, dim) == (1, model.feature_dim)
    rgb = x.expand(-1, 3, -1, -1)
    resized = F.interpolate(rgb, size=(224, 224), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["x"], ((resized + 1) / 2 - mean) / std)
    head = model.net.fc if hasattr(model.net, "fc") else model.net.classifier
    torch.testing.assert_close(logits, head(features))


def test_imagenet_weights_from_local_file_never_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_classifier("imagenet_resnet50", weights=str(tmp_path / "missing.pth"))
    source = build_classifier("imagenet_resnet50", pretrained=False).eval()
    torch.save(source.net.state_dict(), tmp_path / "resnet50.pth")
    loaded = build_classifier("imagenet_resnet50", weights=str(tmp_path / "resnet50.pth")).eval()
    for a, b in zip(source.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_imagenet_densenet_legacy_key_names(tmp_path):
    """torchvision's DenseNet weight files name ``denselayerN.norm.1``; they must load."""
    import torchvision

    net = torchvision.models.densenet201(weights=None)
    legacy = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
              for k, v in net.state_dict().items()}
    assert legacy.keys() != net.state_dict().keys()
    torch.save(legacy, tmp_path / "densenet201.pth")
    sd = _imagenet_state_dict("densenet201", str(tmp_path / "densenet201.pth"))
    assert list(sd) == list(net.state_dict())


# -------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["resnet18", "densenet_small"])
def test_cuda_matches_cpu(name):
    model = randomize_bn(build_classifier(name, in_channels=1, width=8)).double().eval()
    x = images(5, 1, 16, dtype=torch.float64)  # float64: no TF32 on either side
    with torch.no_grad():
        ref = model(x)
        out = model.cuda()(x.cuda())
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)
    assert math.isfinite(float(out[0].sum()))
