"""The CD teacher's ODE step on data with an exact answer: for x0 ~ N(mu, var I) the
denoiser and the probability-flow solution are closed-form (tests/test_samplers_order.py),
so in float64 the Heun step's error is far below DDIM's over the same interval, and over a
fixed interval the error falls ~4x per halving of the step (second order) where DDIM's
falls ~2x."""

import pytest
import torch
from standins import GaussianDenoiser
from test_samplers_order import exact_flow

from rcfd.core.schedule import cosine_schedule
from rcfd.methods.cd_loss import CDLoss, teacher_step

F64 = torch.float64
T, VAR = 1024, 0.25
START, SPAN = 700, 256  # the interval: schedule index 700 -> 444


def setup():
    schedule = cosine_schedule(T, 1)
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 2, 3, 3, dtype=F64, generator=gen) * 0.5
    z = torch.randn(5, 2, 3, 3, dtype=F64, generator=gen)
    return schedule, mu, z, GaussianDenoiser(schedule, mu, VAR)


def solve(solver, steps):
    """Max error of ``steps`` equal teacher steps from START to START - SPAN."""
    schedule, mu, z0, model = setup()
    a, s = schedule.alpha.to(F64), schedule.sigma.to(F64)
    idx = [START - SPAN * i // steps for i in range(steps + 1)]
    z = z0
    for hi, lo in zip(idx, idx[1:]):
        h, l_ = torch.full((5,), hi), torch.full((5,), lo)
        z = teacher_step(model, z, h, l_, (a[h], s[h], a[l_], s[l_]), "x0", solver)
    return float((z - exact_flow(schedule, mu, VAR, z0, idx[0], idx[-1])).abs().max())


def test_heun_is_second_order_and_beats_ddim():
    counts = (4, 8, 16, 32)  # steps of 64 .. 8 indices (CD's digits grid: ~60 of 1024)
    heun = [solve("heun", k) for k in counts]
    ddim = [solve("ddim", k) for k in counts]
    h_ratio = [a / b for a, b in zip(heun, heun[1:])]
    d_ratio = [a / b for a, b in zip(ddim, ddim[1:])]
    assert all(3.5 <= r <= 5.0 for r in h_ratio), (heun, h_ratio)  # measured 4.0-4.2
    assert all(1.7 <= r <= 2.5 for r in d_ratio), (ddim, d_ratio)  # measured 2.0
    assert all(h < d / 5 for h, d in zip(heun, ddim)) and heun[-1] < ddim[-1] / 20


def test_the_loss_uses_the_solver_and_ddim_is_the_default():
    schedule, mu, _, model = setup()
    x0 = mu + VAR ** 0.5 * torch.randn(8, 2, 3, 3, dtype=F64,
                                       generator=torch.Generator().manual_seed(1))
    calls = []

    def counted(z, k):
        calls.append(1)
        return model(z, k)

    n, eps = CDLoss(counted, model, schedule, T, 1, 9).draw(torch.Generator().manual_seed(2), x0)
    out = {}
    for solver in ("ddim", "heun"):
        calls.clear()
        loss = CDLoss(counted, model, schedule, T, 1, 9, solver=solver)
        out[solver] = loss(model, x0, n, eps)
        out[solver + "_calls"] = len(calls)
    assert (out["ddim_calls"], out["heun_calls"]) == (1, 2)
    assert not torch.equal(out["ddim"].f_target, out["heun"].f_target)
    assert CDLoss(counted, model, schedule, T, 1, 9).solver == "ddim"
    with pytest.raises(ValueError, match="solver must be one of"):
        CDLoss(counted, model, schedule, T, 1, 9, solver="euler")
