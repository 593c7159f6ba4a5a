"""Samplers over plans: each equals an independent float64 implementation of METHOD.md's
formulas (fp32 through the compiled DDIM op, float64 through its PyTorch reference), DDIM
equals the old eager sampler, exact denoisers give exact answers, bad inputs are named."""

import math

import pytest
import torch
from standins import GaussianDenoiser, TinyNet

from rcfd import samplers
from rcfd.core.schedule import Schedule, cosine_schedule

F64 = torch.float64
NAMES = samplers.registry.TRAINING_FREE  # the consistency sampler: tests/test_consistency.py
T, TIME_SCALE = 24, 2  # 1, 2, 3, 4 and 8 steps divide T
# (num_steps or an explicit step list, x_T shape): odd batches and odd sizes
CONFIGS = [
    (1, (1, 3, 5, 7)),
    (2, (3, 1, 7, 5)),
    (3, (7, 3, 3, 5)),
    (4, (3, 2, 5, 3)),
    (8, (1, 3, 7, 9)),
    ([24, 23, 17, 9, 4, 1, 0], (3, 3, 5, 7)),
    ([21, 20, 12, 11, 10, 3], (7, 1, 3, 3)),
]


class Scaled(torch.nn.Module):
    """TinyNet with its output scaled up, so that clipping its x0 predictions matters."""

    def __init__(self, ch, scale=3.0):
        super().__init__()
        self.net, self.scale = TinyNet(ch=ch, width=8), scale

    def forward(self, z, t_index):
        return self.scale * self.net(z, t_index)


def reference(name, model, x_T, schedule, steps, time_scale, prediction="x0", clip=True):
    """METHOD.md, "DDIM step" and "Training-free samplers", written out in float64 from the
    schedule tables (the model runs in ``x_T``'s dtype)."""
    idx = [t * time_scale for t in steps]
    a = [float(schedule.alpha[k]) for k in idx]
    s = [float(schedule.sigma[k]) for k in idx]
    lam = [math.log(ai / si) for ai, si in zip(a, s)]
    z, x0s, eps = x_T.double(), [], []
    for i in range(len(steps) - 1):
        out = model(z.to(x_T.dtype), torch.full((z.shape[0],), idx[i])).double()
        x0 = {"x0": out, "eps": (z - s[i] * out) / a[i], "v": a[i] * z - s[i] * out}[prediction]
        x0 = x0.clamp(-1, 1) if clip else x0
        h = lam[i + 1] - lam[i]
        if name == "pndm":
            eps.insert(0, (z - a[i] * x0) / s[i])
            e = eps + [0.0] * 3
            e1 = [e[0], (3 * e[0] - e[1]) / 2, (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12,
                  (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24][min(i, 3)]
            z = a[i + 1] * (z - s[i] * e1) / a[i] + s[i + 1] * e1  # phi: DDIM driven by eps'
            continue
        d = x0
        if name == "dpm-solver" and x0s:
            r = (lam[i] - lam[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0s[-1]
        x0s.append(x0)
        z = (s[i + 1] / s[i]) * z - a[i + 1] * (math.exp(-h) - 1) * d
    return z.clamp(-1, 1) if clip else z


def run(name, model, x_T, steps_or_n, prediction="x0", clip=True, schedule=None, t=T, time_scale=TIME_SCALE):
    kw = dict(steps=steps_or_n) if isinstance(steps_or_n, list) else dict(num_steps=steps_or_n)
    plan = samplers.make_plan(schedule, t, time_scale, prediction=prediction, clip=clip,
                              dtype=x_T.dtype, **kw)
    return samplers.get_sampler(name)(model, x_T, plan), plan


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32-op", "f64-ref"])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c[0]).replace(" ", ""))
@pytest.mark.parametrize("name", NAMES)
def test_sampler_matches_float64_formulas(name, config, prediction, clip, dtype):
    steps_or_n, shape = config
    model = Scaled(shape[1]).to(dtype).eval()
    x_T = torch.randn(shape, dtype=dtype)
    got, plan = run(name, model, x_T, steps_or_n, prediction, clip)
    assert got.shape == x_T.shape and got.dtype == dtype
    want = reference(name, model, x_T, cosine_schedule(T, TIME_SCALE), list(plan.steps),
                     TIME_SCALE, prediction, clip)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == F64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("name", NAMES)
def test_clipping_changes_predictions_and_result(name):
    model = Scaled(3).eval()
    x_T = torch.randn(3, 3, 5, 5)
    clipped, _ = run(name, model, x_T, 4, clip=True)
    raw, _ = run(name, model, x_T, 4, clip=False)
    assert clipped.abs().max() <= 1 and raw.abs().max() > 1
    assert not torch.allclose(clipped, raw.clamp(-1, 1))  # the x0 predictions were clipped too


def test_one_step_dpm_solver_and_pndm_are_ddim():
    model = Scaled(3).eval()
    x_T = torch.randn(5, 3, 7, 5)
    for steps in (1, [24, 9], [3, 0]):
        want, _ = run("ddim", model, x_T, steps)
        for name in ("dpm-solver", "pndm"):
            assert torch.equal(run(name, model, x_T, steps)[0], want)
    two = run("dpm-solver", model, x_T, 2)[0]
    assert not torch.allclose(two, run("ddim", model, x_T, 2)[0])


# --------------------------------------------------------------------------- exact answers


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_steps", [1, 3, 12])
def test_exact_denoiser_of_a_point_is_exact_in_any_number_of_steps(name, num_steps):
    """Data = the point c: every x0 prediction is c, every eps the noise of x_T, so every
    sampler keeps z on ``alpha c + sigma eps`` and z_K = alpha_K c + sigma_K eps (index 0
    is not noise-free)."""
    t, time_scale = 12, 2
    sched = cosine_schedule(t, time_scale)
    c = torch.rand(1, 3, 2, 5, dtype=F64) * 1.8 - 0.9
    x_T = torch.randn(4, 3, 2, 5, dtype=F64)
    eps = (x_T - sched.alpha[t * time_scale] * c) / sched.sigma[t * time_scale]
    want = (sched.alpha[0] * c + sched.sigma[0] * eps).clamp(-1, 1)
    got, _ = run(name, GaussianDenoiser(sched, c), x_T, num_steps, t=t, time_scale=time_scale)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", NAMES)
def test_eps_prediction_samples_like_x0_prediction(name):
    sched = cosine_schedule(8, 1)
    mu = torch.randn(1, 2, 3, 3, dtype=F64) * 0.5
    x_T = torch.randn(3, 2, 3, 3, dtype=F64)
    a, _ = run(name, GaussianDenoiser(sched, mu, 0.2), x_T, 4, t=8, time_scale=1)
    b, _ = run(name, GaussianDenoiser(sched, mu, 0.2, "eps"), x_T, 4, "eps", t=8, time_scale=1)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_explicit_steps_equal_num_steps(name):
    model = GaussianDenoiser(cosine_schedule(16, 1), torch.zeros(1, 1, 3, 3, dtype=F64), 0.3)
    x_T = torch.randn(2, 1, 3, 3, dtype=F64)
    torch.testing.assert_close(run(name, model, x_T, 4, t=16, time_scale=1)[0],
                               run(name, model, x_T, [16, 12, 8, 4, 0], t=16, time_scale=1)[0])


# --------------------------------------------------------------------------- plans


def test_plan_holds_the_schedule_at_the_steps():
    sched = cosine_schedule(8, 128)
    plan = samplers.make_plan(sched, 8, 128, 4)
    assert plan.steps == (8, 6, 4, 2, 0) and plan.num_steps == 4 and plan.time_scale == 128
    assert plan.t_index.dtype == torch.int64 and plan.t_index.tolist() == [1024, 768, 512, 256, 0]
    assert plan.alpha.dtype == torch.float32 and plan.device == torch.device("cpu")
    torch.testing.assert_close(plan.alpha, sched.alpha[plan.t_index].float())
    torch.testing.assert_close(plan.sigma, sched.sigma[plan.t_index].float())
    f64 = samplers.make_plan(None, 8, 128, steps=[8, 5, 0], dtype=F64, prediction="eps", clip=False)
    assert torch.equal(f64.sigma, sched.sigma[[1024, 640, 0]])
    assert (f64.prediction, f64.clip, f64.dtype) == ("eps", False, F64)


def test_plans_compare_by_value_whatever_their_device():
    a = samplers.make_plan(None, 8, 2, 4)
    assert a == samplers.make_plan(cosine_schedule(8, 2), 8, 2, steps=[8, 6, 4, 2, 0])
    assert hash(a) == hash(samplers.make_plan(None, 8, 2, 4))
    assert a.to("meta") == a and a.to("cpu", copy=True).alpha is not a.alpha
    for other in (samplers.make_plan(None, 8, 2, 2), samplers.make_plan(None, 8, 2, 4, clip=False),
                  samplers.make_plan(None, 8, 2, 4, dtype=F64),
                  samplers.make_plan(None, 16, 1, steps=[8, 6, 4, 2, 0])):  # same indices, other T
        assert a != other


def test_bad_step_arguments_are_refused():
    with pytest.raises(ValueError, match="exactly one"):
        samplers.make_plan(None, 8, 1, 2, steps=[8, 0])
    with pytest.raises(ValueError, match="exactly one"):
        samplers.make_plan(None, 8, 1)
    with pytest.raises(ValueError, match="decreasing"):
        samplers.make_plan(None, 8, 1, steps=[0, 8])
    with pytest.raises(ValueError, match="decreasing"):
        samplers.make_plan(None, 8, 1, steps=[8, 8, 0])
    with pytest.raises(ValueError, match="decreasing"):
        samplers.make_plan(None, 8, 1, steps=[8])
    with pytest.raises(ValueError, match="0..T"):
        samplers.make_plan(None, 8, 1, steps=[9, 0])
    with pytest.raises(ValueError, match="0..T"):
        samplers.make_plan(None, 8, 1, steps=[4, -1])
    with pytest.raises(TypeError, match="integers"):
        samplers.make_plan(None, 8, 1, steps=[8, 2.5, 0])
    with pytest.raises(ValueError, match="divide"):
        samplers.make_plan(None, 8, 1, 3)
    with pytest.raises(ValueError, match="positive integer"):
        samplers.make_plan(None, 8, 0, 2)


def test_bad_plan_arguments_are_refused():
    with pytest.raises(ValueError, match="prediction must be one of 'x0', 'eps'"):
        samplers.make_plan(None, 8, 1, 2, prediction="velocity")
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        samplers.make_plan(None, 8, 1, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="schedule has 9 entries"):
        samplers.make_plan(cosine_schedule(8, 1), 8, 2, 2)
    zero = Schedule(alpha=torch.ones(9, dtype=F64), sigma=torch.linspace(1, 0, 9, dtype=F64))
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        samplers.make_plan(zero, 8, 1, 2)
    plan = samplers.make_plan(None, 8, 1, 2)
    with pytest.raises(ValueError, match="t_index must be steps"):
        samplers.Plan(plan.steps, 2, plan.t_index, plan.alpha, plan.sigma)
    with pytest.raises(ValueError, match="alpha must be a float32 or float64"):
        samplers.Plan(plan.steps, 1, plan.t_index, plan.alpha[:2], plan.sigma)


def test_bad_sampler_inputs_are_refused():
    model = TinyNet(ch=3, width=8).eval()
    plan = samplers.make_plan(None, 8, 1, 2)
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*'ddim', 'dpm-solver', 'pndm'"):
        samplers.get_sampler("euler")
    with pytest.raises(ValueError, match="use plan.to"):
        samplers.ddim(model, torch.randn(1, 3, 4, 4), plan.to("meta"))
    with pytest.raises(TypeError, match="make_plan"):
        samplers.pndm(model, torch.randn(1, 3, 4, 4), [8, 4, 0])
    with pytest.raises(ValueError, match="must predict an image"):
        samplers.dpm_solver_2m(lambda z, t: z[:, :1], torch.randn(2, 3, 4, 4), plan)
    assert samplers.get_sampler(samplers.pndm) is samplers.pndm
    assert samplers.sampler_name(samplers.dpm_solver_2m) == "dpm-solver"
