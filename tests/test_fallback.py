"""The fast paths degrade, never crash (DESIGN.md): a compiled training step or a CUDA-graph
capture that raises logs one line naming the error and the switch that turns it off, and
the run goes on eagerly with the eager run's results, bit for bit.

On the CPU the loop never compiles and nothing is captured, so the tests force the fast
path on where it is decided (``compile_step``, ``capture_unavailable``) and make the
compile or the capture raise."""

import importlib
import logging

import pytest
import torch

from rcfd.core.schedule import cosine_schedule
from rcfd.core.unet import UNet, UNetConfig
from rcfd.data import DatasetSpec
from rcfd.io.modelfile import load_model_file
from rcfd.methods.base import BaseStageConfig, train_base
from rcfd.methods.common import TrainOptions
from rcfd.samplers import GraphSampler, generate, make_plan, sample
from rcfd.training import fast_step, loop
from rcfd.training.rundir import RunContext

generate_module = importlib.import_module("rcfd.samplers.generate")  # the name is the function
graph_module = importlib.import_module("rcfd.samplers.graph")

UNET = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1,), attn=(), num_res_blocks=1,
                  dropout=0.2, num_time_indices=9)  # dropout: the failed step's RNG matters
SWITCH = "--set base.options.compile=false"

pytestmark = pytest.mark.usefixtures("one_thread")


def train(tmp_path, name: str, compiled: bool) -> dict:
    """The base stage's saved weights after 3 steps (``compiled``: options.compile)."""
    opts = TrainOptions(bf16=False, channels_last=False, fused=False, compile=compiled)
    cfg = BaseStageConfig(unet=UNET, T=8, lr=2e-3, warmup=1, batch_size=8, steps=3,
                          ema_decay=0.9, num_sample_images=0, log_interval=1, options=opts)
    path = train_base(cfg, DatasetSpec(name="digits", image_size=8),
                      RunContext(tmp_path / name, device="cpu", progress=False))
    return load_model_file(path)


def assert_same_weights(a: dict, b: dict) -> None:
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


class _FailingBackward(torch.autograd.Function):
    """Identity forward; its backward raises, as a lazily compiled backward may."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward compile failed (test)\nsecond line of the report")


def compile_raises(*args, **kwargs):
    raise RuntimeError("torch.compile failed (test)\nsecond line of the report")


def compiled_call_raises(region, backend="inductor"):
    def loss(*args):
        raise RuntimeError("first compiled call failed (test)\nsecond line of the report")
    return loss


def compiled_backward_raises(region, backend="inductor"):
    def loss(objective, model, x0, t, noise):
        value, terms = fast_step.objective_loss(objective, model, x0, t, noise)  # draws dropout
        return _FailingBackward.apply(value), terms
    return loss


@pytest.fixture(scope="module")
def eager_weights(tmp_path_factory):
    return train(tmp_path_factory.mktemp("eager"), "eager", compiled=False)


@pytest.mark.parametrize("where, patch", [
    ("torch.compile", ("torch", compile_raises)),
    ("first call", ("compiled_objective", compiled_call_raises)),
    ("first backward", ("compiled_objective", compiled_backward_raises)),
])
def test_a_failing_compiled_step_falls_back_to_the_eager_step(where, patch, eager_weights,
                                                              tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(loop, "compile_step", lambda requested, device: bool(requested))
    name, fake = patch
    if name == "torch":  # what compiled_objective calls, made afresh here (it is cached)
        monkeypatch.setattr(fast_step, "compiled_objective", fast_step.compiled_objective.__wrapped__)
        monkeypatch.setattr(torch, "compile", fake)
    else:
        monkeypatch.setattr(fast_step, name, fake)
    got = train(tmp_path, "fallback", compiled=True)
    assert_same_weights(got, eager_weights)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "continuing on the eager path" in line]
    assert len(lines) == 1, err
    assert "compiling the base step (model) failed (RuntimeError: " in lines[0]
    assert "failed (test)" in lines[0] and "second line" not in err
    assert SWITCH in lines[0]
    assert "compiled the base step" not in err  # no compile time claimed for an eager step


# --------------------------------------------------------------------------- graph capture


def sampler_case():
    torch.manual_seed(0)
    model = UNet(UNET).eval()
    plan = make_plan(cosine_schedule(8, 1), 8, 1, 4)
    return model, plan


def capture_raises(self, x_T, plan):
    raise RuntimeError("capture failed (test)\nsecond line of the report")


def fallback_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "continuing on the eager path" in r.getMessage()]


def test_a_failing_capture_falls_back_to_the_eager_sampler(monkeypatch, caplog):
    model, plan = sampler_case()
    monkeypatch.setattr(graph_module, "capture_unavailable", lambda device: None)
    monkeypatch.setattr(GraphSampler, "_capture", capture_raises)
    x_T = [torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    graphs = GraphSampler(model, plan)
    with caplog.at_level(logging.WARNING, logger="rcfd"):
        got = [graphs(x) for x in x_T]
    assert all(torch.equal(g, sample(model, x, plan)) for g, x in zip(got, x_T))
    (line,) = fallback_records(caplog)
    assert "capturing the 4-step ddim sampler in a CUDA graph failed (RuntimeError: " \
           "capture failed (test))" in line and "--no-cuda-graph" in line
    assert graphs.fell_back == "RuntimeError: capture failed (test)" and graphs.num_graphs == 0


def test_generate_with_a_failing_capture_gives_the_eager_batches(monkeypatch, caplog):
    model, plan = sampler_case()
    kw = dict(shape=(1, 8, 8), plan=plan, seed=3, dtype="fp32", progress=False)
    want = list(generate(model, 5, 2, use_cuda_graph=False, **kw))
    monkeypatch.setattr(generate_module, "capture_unavailable", lambda device: None)
    monkeypatch.setattr(graph_module, "capture_unavailable", lambda device: None)
    captures = []

    def capture(self, x_T, plan):
        captures.append(x_T.shape)
        capture_raises(self, x_T, plan)

    monkeypatch.setattr(GraphSampler, "_capture", capture)
    with caplog.at_level(logging.WARNING, logger="rcfd"):
        got = list(generate(model, 5, 2, use_cuda_graph=True, compile=False, **kw))
    assert captures == [torch.Size([2, 1, 8, 8])]  # tried once, then eager for good
    assert len(got) == len(want) == 3 and all(torch.equal(g, w) for g, w in zip(got, want))
    assert len(fallback_records(caplog)) == 1
