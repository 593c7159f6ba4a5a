"""The public Python API's contract (rcfd.load / Model.plan / Model.sample / rcfd.measure):
Model.sample draws the images python -m rcfd.sample's path draws for the same seed, whatever
either's batch size; given noise it is our sampler on that noise; bad arguments raise one error naming the
problem; every public name is exported and documented."""

import inspect

import pytest
import torch

import rcfd
from rcfd.api import measure as api_measure
from rcfd.api import model as api_model
from rcfd.core.unet import UNet, UNetConfig
from rcfd.data import to_uint8
from rcfd.errors import CheckpointError, UsageError
from rcfd.evaluation.measure import sample_images
from rcfd.io.checkpoint import save_diffusion_checkpoint
from rcfd.samplers import ddim, make_plan

T, SCALE = 2, 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), attn=(), num_res_blocks=1,
                          dropout=0.0, num_time_indices=T * SCALE + 1))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return rcfd.load(save_diffusion_checkpoint(d / "T2.pt", net, T=T, time_scale=SCALE), "cpu")


@pytest.mark.parametrize("steps, sampler", [(2, "ddim"), (1, "ddim"), (2, "dpm-solver")])
def test_sample_is_the_sample_clis_path(model, steps, sampler):
    x = model.sample(7, steps=steps, sampler=sampler, seed=3, batch_size=3)
    assert x.shape == (7, 1, 8, 8) and x.dtype == torch.float32 and x.abs().max() <= 1
    u8 = sample_images(model.net, model.info, num_samples=7, num_steps=steps, batch_size=5, sampler=sampler,
                       device="cpu", seed=3, progress=False)
    torch.testing.assert_close(to_uint8(x), u8, rtol=0, atol=1)  # batch 3 vs 5: at most rounding
    torch.testing.assert_close(model.sample(4, steps=steps, sampler=sampler, seed=3, batch_size=2),
                               x[:4], rtol=0, atol=1e-6)
    assert not torch.equal(x, model.sample(7, steps=steps, sampler=sampler, seed=4, batch_size=3))


def test_sample_from_given_noise_is_our_sampler_on_it(model):
    noise = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        ours = ddim(model.net, noise, make_plan(None, T, SCALE, T))
    torch.testing.assert_close(model.sample(5, noise=noise), ours, rtol=0, atol=0)
    plan = model.plan(steps=1)
    assert plan.t_index.tolist() == [T * SCALE, 0] and plan.prediction == model.info.prediction


@pytest.mark.parametrize("kwargs, needle", [
    ({"n": 0}, "n must be a positive integer"), ({"n": 2.0}, "n must be a positive integer"),
    ({"n": True}, "n must be a positive integer"),
    ({"n": 2, "batch_size": 0}, "batch_size must be a positive integer"),
    ({"n": 2, "noise": torch.randn(3, 1, 8, 8)}, "noise must be a float tensor of shape (2, 1, 8, 8)"),
    ({"n": 2, "noise": torch.zeros(2, 1, 8, 8, dtype=torch.int64)}, "noise must be a float tensor"),
    ({"n": 2, "steps": 3}, "divide"),
])
def test_bad_sample_arguments_name_the_problem(model, kwargs, needle):
    with pytest.raises(ValueError) as e:
        model.sample(**kwargs)
    assert needle in str(e.value)


def test_measure_refuses_bad_images_and_references(model):
    x = model.sample(20, seed=0)
    with pytest.raises(UsageError, match=r"must be a \[N, C, H, W\] tensor"):
        rcfd.measure(x[0], "digits")
    with pytest.raises(UsageError, match="uint8 or float"):
        rcfd.measure(torch.zeros(20, 1, 8, 8, dtype=torch.int32), "digits")
    with pytest.raises(UsageError, match="reference 'nope'"):
        rcfd.measure(x, "nope")
    with pytest.raises(UsageError, match="dataset name, an ImageDataset or an image tensor"):
        rcfd.measure(x, 3)
    with pytest.raises(UsageError, match=r"the images are \(1, 8, 8\) but the reference holds \(1, 16, 16\)"):
        rcfd.measure(x, torch.zeros(30, 1, 16, 16))


def test_load_refuses_what_is_not_a_diffusion_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        rcfd.load(bad, "cpu")


def test_every_public_name_is_exported_and_documented():
    assert sorted(rcfd.__all__) == ["Model", "__version__", "load", "measure"]
    assert set(rcfd.__all__) <= set(dir(rcfd))
    assert rcfd.load is api_model.load and rcfd.Model is api_model.Model and rcfd.measure is api_measure.measure
    for module in (api_model, api_measure):
        for name in module.__all__:
            obj = getattr(module, name)
            assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
    for name, member in inspect.getmembers(rcfd.Model):
        if not name.startswith("_"):
            assert inspect.getdoc(member), f"Model.{name} has no docstring"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rcfd.nope
