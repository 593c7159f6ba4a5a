"""The consistency parameterisation, the CD loss and the consistency sampler: the boundary
holds bit for bit, the CD loss equals a float64 reference written here from the paper's
equations, and on Gaussian data a consistency function built from the exact probability-flow
ODE maps a whole trajectory to one point, has ~0 CD loss and samples the boundary
distribution, while a perturbed one does not."""

import math

import pytest
import torch

from rcfd.core.consistency import (
    adaptive_mu,
    adaptive_N,
    boundary,
    cd_grid,
    consistency_output,
    distance,
    skip_out,
)
from rcfd.core.schedule import cosine_schedule
from rcfd.methods.cd_loss import CDLoss
from rcfd.samplers import get_sampler, make_plan
from rcfd.samplers.consistency import consistency, consistency_at

SD = 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_is_exact_bitwise(dtype):
    sched = cosine_schedule(64, 1)
    assert sched.sigma[0] > 0  # our first index is not noise-free: it is t_min
    a0, s0 = (c.to(dtype) for c in (sched.alpha[0], sched.sigma[0]))
    c_skip, c_out = skip_out(s0 / a0, s0 / a0)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    g = torch.Generator().manual_seed(0)
    z, x0 = (torch.randn(3, 1, 4, 4, generator=g, dtype=dtype) * 5 for _ in range(2))
    assert torch.equal(consistency_output(z, x0, a0, s0, a0, s0), z / a0)
    # through the sampler's path: the plan's last step is the boundary
    plan = make_plan(sched, 64, 1, 1, dtype=dtype, clip=False)
    f = consistency_at(lambda z_, t: x0, z, make_plan(sched, 64, 1, steps=[1, 0], dtype=dtype), 1)
    assert torch.equal(f, z / plan.alpha[-1])
    # and away from the boundary c_skip < 1
    assert skip_out(sched.sigma[5:6] / sched.alpha[5:6], s0.double() / a0.double())[0] < 1


def test_cd_grid():
    g = cd_grid(64, 2, 18)
    assert g[0] == 0 and g[-1] == 128 and len(g) == 18
    assert bool((g[1:] > g[:-1]).all()) and bool((g % 2 == 0).all())
    assert cd_grid(16, 1, 17).tolist() == list(range(17))
    for bad in (1, 18, 2.0):
        with pytest.raises(ValueError, match="N must be"):
            cd_grid(16, 1, bad)


def test_adaptive_schedule_against_hand_computed_values():
    """N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1, mu = exp(s0 log mu0 / N)."""
    # the paper's CIFAR-10 values s0=2, s1=150 over K=100 steps
    assert adaptive_N(0, 100, 2, 150) == 2  # ceil(2 - 1) + 1
    assert adaptive_N(100, 100, 2, 150) == 151  # ceil(151 - 1) + 1
    assert adaptive_N(50, 100, 2, 150) == 107  # sqrt(11402.5) = 106.78 -> ceil(105.78) + 1
    assert adaptive_N(1, 100, 2, 150) == 16  # sqrt(231.97) = 15.23 -> ceil(14.23) + 1
    assert adaptive_N(8, 16, 2, 17) == 13  # sqrt(164) = 12.81 -> 12 + 1
    Ns = [adaptive_N(k, 1000, 2, 17) for k in range(1001)]
    assert Ns == sorted(Ns) and Ns[0] == 2 and Ns[-1] == 18
    assert adaptive_mu(2, 2, 0.9) == pytest.approx(0.9, rel=1e-15)  # mu(0) = mu0
    assert adaptive_mu(13, 2, 0.9) == pytest.approx(0.9 ** (2 / 13), rel=1e-15)  # 0.98392
    assert adaptive_mu(151, 2, 0.9) == pytest.approx(0.99860547, rel=1e-8)


def test_distances_against_their_formulas():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    d = 3 * 8 * 8
    c = 0.00054 * math.sqrt(d)
    for i in range(4):
        sq = float(((a[i] - b[i]) ** 2).sum())
        assert distance(a, b, "l2")[i].item() == pytest.approx(sq / d, rel=1e-14)
        assert distance(a, b, "pseudo-huber")[i].item() == pytest.approx(math.sqrt(sq + c * c) - c, rel=1e-14)
    assert distance(a, a, "pseudo-huber").abs().max() == 0
    with pytest.raises(ValueError, match="distance must be"):
        distance(a, b, "lpips")


class TinyNet(torch.nn.Module):
    """``x0_hat = tanh(w * z + b * index / 100)`` per pixel: depends on z and on time."""

    def __init__(self, w, b):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, z, index):
        return torch.tanh(self.w * z + self.b * index.to(z.dtype).view(-1, 1, 1, 1) / 100)


def reference_cd_loss(teacher, target, student, x0, n, eps, T, ts, N, kind):
    """Algorithm 2 sample by sample in float64, from the paper's equations in k-diffusion
    variables (x = z / alpha, s = sigma / alpha), with a DDIM teacher step."""
    abar = cosine_schedule(T, ts).alpha.double() ** 2
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    s_min = float(sigma[0] / alpha[0])

    def f(net, z, k):
        s = float(sigma[k] / alpha[k])
        c_skip = SD ** 2 / ((s - s_min) ** 2 + SD ** 2)
        x0_hat = net(z[None], torch.tensor([k]))[0]
        return c_skip * z / float(alpha[k]) + (1 - c_skip) * x0_hat

    total = 0.0
    for b in range(x0.shape[0]):
        k_lo, k_hi = (int(n[b]) * T // (N - 1)) * ts, ((int(n[b]) + 1) * T // (N - 1)) * ts
        a_hi, s_hi, a_lo, s_lo = (float(v) for v in (alpha[k_hi], sigma[k_hi], alpha[k_lo], sigma[k_lo]))
        z_hi = a_hi * x0[b] + s_hi * eps[b]
        with torch.no_grad():
            x_t = teacher(z_hi[None], torch.tensor([k_hi]))[0]
            z_lo = a_lo * x_t + s_lo * (z_hi - a_hi * x_t) / s_hi
            tgt = f(target, z_lo, k_lo)
        diff = (f(student, z_hi, k_hi) - tgt).flatten()
        d = diff.numel()
        if kind == "l2":
            total = total + diff.square().mean()
        else:
            c = 0.00054 * math.sqrt(d)
            total = total + (diff.square().sum() + c * c).sqrt() - c
    return total / x0.shape[0]


@pytest.mark.parametrize("kind", ["l2", "pseudo-huber"])
def test_cd_loss_matches_float64_reference(kind):
    T, ts, N = 16, 2, 9
    teacher = TinyNet(0.7, -0.3).requires_grad_(False)
    target = TinyNet(0.5, 0.2).requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(6, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    loss = CDLoss(teacher, target, cosine_schedule(T, ts), T, ts, N, kind)
    n, eps = loss.draw(g, x0)
    assert int(n.min()) >= 0 and int(n.max()) <= N - 2
    n[0], n[1] = 0, N - 2  # both ends of the grid
    s1, s2 = TinyNet(0.6, 0.1), TinyNet(0.6, 0.1)
    out = loss(s1, x0, n, eps)
    ref = reference_cd_loss(teacher, target, s2, x0, n, eps, T, ts, N, kind)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-15) and out.loss > 0
    assert not out.f_target.requires_grad
    out.loss.backward()
    ref.backward()
    assert s1.w.grad.item() == pytest.approx(s2.w.grad.item(), rel=1e-10)
    assert target.w.grad is None and teacher.w.grad is None


# --------------------------------------------------------------------------- Gaussian data

MU, VAR = 0.3, 0.2  # x0 ~ N(MU, VAR) per pixel


def exact_f(z, alpha, sigma, a0, s0):
    """The probability-flow ODE's map to the boundary for N(MU, VAR) data: the flow keeps
    u = (z - alpha MU) / sqrt(alpha^2 VAR + sigma^2) fixed; f = z_0 / alpha_0."""
    u = (z - alpha * MU) / (alpha ** 2 * VAR + sigma ** 2).sqrt()
    return (a0 * MU + (a0 ** 2 * VAR + s0 ** 2).sqrt() * u) / a0


class ExactConsistency(torch.nn.Module):
    """The network whose consistency function is :func:`exact_f` (``x0_F`` solved from
    ``f = c_skip x + c_out x0_F``), plus ``delta`` times a perturbation."""

    def __init__(self, sched, delta=0.0):
        super().__init__()
        self.alpha, self.sigma, self.delta = sched.alpha, sched.sigma, delta

    def forward(self, z, index):
        a, s = (v[index].view(-1, 1, 1, 1) for v in (self.alpha, self.sigma))
        a0, s0 = self.alpha[0], self.sigma[0]
        c_skip, c_out = skip_out(s / a, s0 / a0)
        fx = exact_f(z, a, s, a0, s0) + self.delta * torch.sin(3 * z)
        safe = torch.where(c_out > 0, c_out, torch.ones_like(c_out))
        return torch.where(c_out > 0, (fx - c_skip * z / a) / safe, torch.zeros_like(z))


def test_gaussian_exact_consistency_function():
    T = 256
    sched = cosine_schedule(T, 1)
    net = ExactConsistency(sched)
    g = torch.Generator().manual_seed(5)
    # one probability-flow trajectory per sample: u fixed, z_k = alpha_k MU + sqrt(...) u
    u = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    fs = []
    for k in (0, 1, 17, 128, 255, 256):
        a, s = sched.alpha[k], sched.sigma[k]
        z = a * MU + (a ** 2 * VAR + s ** 2).sqrt() * u
        plan = make_plan(sched, T, 1, steps=[k, 0] if k else [1, 0], dtype=torch.float64, clip=False)
        fs.append(consistency_at(net, z, plan, 0 if k else 1))
    for f in fs[1:]:
        torch.testing.assert_close(f, fs[0], rtol=0, atol=1e-12)

    x0 = MU + VAR ** 0.5 * torch.randn(256, 1, 2, 2, generator=g, dtype=torch.float64)
    teacher = lambda z, k: (MU + (sched.alpha[k].view(-1, 1, 1, 1) * VAR * (z - sched.alpha[k].view(-1, 1, 1, 1) * MU))  # noqa: E731
                            / (sched.alpha[k].view(-1, 1, 1, 1) ** 2 * VAR + sched.sigma[k].view(-1, 1, 1, 1) ** 2))
    loss = CDLoss(teacher, net, sched, T, 1, T + 1, "l2")
    n, eps = loss.draw(g, x0)
    exact = loss(net, x0, n, eps).loss.item()
    perturbed = loss(ExactConsistency(sched, delta=0.05), x0, n, eps).loss.item()
    assert exact < 1e-7 and perturbed > 1e3 * exact, (exact, perturbed)

    # one-step sampling gives the boundary distribution N(MU, VAR + s_min^2)
    x_T = torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
    plan = make_plan(sched, T, 1, 1, dtype=torch.float64, clip=False)
    out = get_sampler("consistency")(net, x_T, plan)
    var0 = VAR + float(sched.sigma[0] / sched.alpha[0]) ** 2
    assert abs(out.mean().item() - MU) < 4 * math.sqrt(var0 / 20000)
    assert abs(out.var().item() / var0 - 1) < 0.05
    torch.testing.assert_close(out, consistency_at(net, x_T, plan, 0), rtol=0, atol=0)
    # a 4-step run: every re-noised point is mapped back to the same distribution too
    out4 = consistency(net, x_T, make_plan(sched, T, 1, 4, dtype=torch.float64, clip=False),
                       generator=torch.Generator().manual_seed(0))
    assert abs(out4.var().item() / var0 - 1) < 0.05 and not torch.equal(out4, out)


def test_multistep_sampler_is_algorithm_1():
    """The K-step sampler with given noise equals the loop written out here, and clips."""
    sched = cosine_schedule(16, 1)
    net = TinyNet(1.5, 0.4).requires_grad_(False)
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(3, 1, 2, 2, generator=g)
    noise = [torch.randn(3, 1, 2, 2, generator=g) for _ in range(3)]
    plan = make_plan(sched, 16, 1, 4)  # steps 16, 12, 8, 4, 0; clipped
    a, s = sched.alpha.float(), sched.sigma.float()
    a0, s0 = a[0], s[0]

    def f(z, k):
        c_skip, c_out = skip_out(s[k] / a[k], s0 / a0)
        return (c_skip * z / a[k] + c_out * net(z.double(), torch.tensor([k] * 3)).float()).clamp(-1, 1)

    x = f(x_T, 16)
    for eps, k in zip(noise, (12, 8, 4)):
        x = f(a[k] * x + s[k] * eps, k)
    torch.testing.assert_close(consistency(lambda z, t: net(z.double(), t).float(), x_T, plan,
                                           noise=noise), x, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="end at step 0"):
        consistency(net, x_T, make_plan(sched, 16, 1, steps=[16, 8]))
    with pytest.raises(ValueError, match="noise must hold 3"):
        consistency(net, x_T, plan, noise=noise[:1])


def test_boundary_helper_matches_schedule():
    sched = cosine_schedule(8, 2)
    a, s = boundary(sched, torch.zeros(1, dtype=torch.float64))
    assert a.item() == sched.alpha[0].item() and s.item() == sched.sigma[0].item()


def test_default_renoising_is_a_function_of_x_T():
    """Without noise or a generator the multistep sampler is reproducible from x_T alone
    (the evaluation's noise contract), and other x_T get other fresh noise."""
    sched = cosine_schedule(16, 1)
    plan = make_plan(sched, 16, 1, 4, clip=False)
    ident = lambda z, t: torch.zeros_like(z)  # noqa: E731  f = c_skip x: the noise shows
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a, b = consistency(ident, x_T, plan), consistency(ident, x_T.clone(), plan)
    assert torch.equal(a, b)
    c = consistency(ident, x_T + 1e-3, plan)
    assert (c - a).abs().max() > 0.1  # not just the 1e-3 shift: fresh noise of its own
