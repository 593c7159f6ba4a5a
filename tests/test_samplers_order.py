"""Convergence order on data with an exact answer (METHOD.md, "Training-free samplers"):
for x0 ~ N(mu, s^2 I) the denoiser and the probability-flow ODE solution are closed-form, so
in float64 without clipping each sampler's error against the exact z_K must fall ~2^k-fold
when the number of steps doubles (k = 1 for DDIM, 2 for DPM-Solver++(2M) and for PNDM with
the multistep warm-up, whose first-order first step caps it at 2)."""

import pytest
import torch
from standins import GaussianDenoiser

from rcfd import samplers
from rcfd.core.schedule import Schedule, cosine_schedule

F64 = torch.float64
ORDER = {"ddim": 1, "dpm-solver": 2, "pndm": 2}
T = 1024
STEP_COUNTS = (16, 32, 64, 128)
VAR = 0.25  # s^2


def log_snr_linear_schedule(n: int, lam_min: float, lam_max: float) -> Schedule:
    """A schedule with ``lambda = log(alpha / sigma)`` linear in the index, from ``lam_max`` at
    index 0 to ``lam_min`` at ``n``, variance preserving: uniform steps in t are uniform in
    lambda, the natural variable of these solvers."""
    lam = torch.linspace(lam_max, lam_min, n + 1, dtype=F64)
    return Schedule(alpha=torch.sigmoid(lam).sqrt(), sigma=torch.sigmoid(-lam).sqrt())


def exact_flow(schedule, mu, var, z_t, t, s):
    """The probability-flow ODE solution from index t to s for x0 ~ N(mu, var I):
    ``z_s = alpha_s mu + sqrt(alpha_s^2 var + sigma_s^2) (z_t - alpha_t mu) /
    sqrt(alpha_t^2 var + sigma_t^2)``."""
    a_t, s_t = schedule.alpha[t], schedule.sigma[t]
    a_s, s_s = schedule.alpha[s], schedule.sigma[s]
    return a_s * mu + (a_s**2 * var + s_s**2).sqrt() * (z_t - a_t * mu) / (a_t**2 * var + s_t**2).sqrt()


def errors(name, schedule, steps_for):
    """Max error against the exact z_K for each step count of :data:`STEP_COUNTS`."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 2, 3, 3, dtype=F64, generator=gen) * 0.5
    x_T = torch.randn(5, 2, 3, 3, dtype=F64, generator=gen)
    model = GaussianDenoiser(schedule, mu, VAR)
    out = []
    for k in STEP_COUNTS:
        plan = samplers.make_plan(schedule, T, 1, clip=False, dtype=F64, **steps_for(k))
        want = exact_flow(schedule, mu, VAR, x_T, plan.steps[0], plan.steps[-1])
        out.append(float((samplers.get_sampler(name)(model, x_T, plan) - want).abs().max()))
    return out


def check_order(name, errs):
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    print(f"{name}: steps {STEP_COUNTS} errors {['%.2e' % e for e in errs]} "
          f"ratios {['%.2f' % r for r in ratios]} (want ~{2 ** ORDER[name]})")
    want = 2 ** ORDER[name]
    for r in ratios[1:]:  # the first doubling may be pre-asymptotic
        assert 0.75 * want <= r <= 1.5 * want, (name, errs, ratios)


@pytest.mark.parametrize("name", list(ORDER))
def test_order_with_steps_uniform_in_lambda(name):
    schedule = log_snr_linear_schedule(T, -3.0, 6.0)
    check_order(name, errors(name, schedule, lambda k: dict(num_steps=k)))


@pytest.mark.parametrize("name", ["ddim", "dpm-solver"])
def test_order_on_the_cosine_schedule_over_a_sub_range(name):
    """Steps uniform in t from 960 to 64 of the 1024-step cosine schedule (PNDM reaches its
    asymptotic ratio there only past 128 steps, so it is measured in lambda above)."""
    schedule = cosine_schedule(T, 1)
    check_order(name, errors(name, schedule, lambda k: dict(steps=list(range(960, 63, -896 // k)))))


def test_higher_order_samplers_beat_ddim_at_equal_calls():
    schedule = log_snr_linear_schedule(T, -3.0, 6.0)
    ddim = errors("ddim", schedule, lambda k: dict(num_steps=k))
    for name in ("dpm-solver", "pndm"):
        assert all(e < d / 10 for e, d in zip(errors(name, schedule, lambda k: dict(num_steps=k)), ddim))
