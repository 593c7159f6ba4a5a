"""Losses of METHOD.md against float64 references computed here, analytic denoisers for the
progressive-distillation algebra, and the RCFD ablation switches."""

import copy
import math

import pytest
import torch
from standins import GaussianDenoiser, TinyNet

from rcfd import losses
from rcfd.core.schedule import cosine_schedule, eps_from_x0, schedule_at, x0_from_eps
from rcfd.losses import DenoisingLoss, PDLoss, RCFDLoss, RCFDLossConfig

F64 = torch.float64


# --------------------------------------------------------------------------- stand-ins


class TinyClassifier(torch.nn.Module):
    """``(logits, features)`` with ``features = tanh(W1 x)``, ``logits = W2 features``."""

    def __init__(self, in_dim, d=9, k=5):
        super().__init__()
        self.f = torch.nn.Linear(in_dim, d)
        self.head = torch.nn.Linear(d, k)

    def forward(self, x):
        feats = torch.tanh(self.f(x.flatten(1)))
        return self.head(feats), feats


def frozen(module):
    return module.eval().requires_grad_(False)


# --------------------------------------------------------------------------- references


def ref_mse(a, b):
    return torch.stack([((a[i].double() - b[i].double()) ** 2).mean() for i in range(a.shape[0])])


def ref_softmax(x):
    x = x.double()
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def ref_entropy(logits):
    p = ref_softmax(logits)
    return -torch.special.xlogy(p, p).sum(-1).mean()


def ref_diversity(logits):
    pbar = ref_softmax(logits).mean(0)
    return torch.special.xlogy(pbar, pbar).sum()


def ref_kl(student, teacher, tau_t, tau_s):
    p = ref_softmax(teacher.double() / tau_t)
    q = ref_softmax(student.double() / tau_s)
    return (torch.special.xlogy(p, p) - p * torch.log(q)).sum(-1).mean()


# --------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 3, 5, 3)])
def test_x0_eps_conversions_invert_each_other(shape):
    z, x0 = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
    a = torch.rand(shape[0], dtype=F64) * 0.9 + 0.05
    s = (1 - a * a).sqrt()
    eps = eps_from_x0(z, x0, a, s)
    torch.testing.assert_close(x0_from_eps(z, eps, a, s), x0)
    torch.testing.assert_close(a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps, z)


def test_predict_x0_and_eps_models_agree():
    sched = cosine_schedule(16, 1)
    mu = torch.randn(1, 2, 3, 5, dtype=F64)
    z = torch.randn(4, 2, 3, 5, dtype=F64)
    idx = torch.tensor([0, 3, 9, 16])
    a, s = schedule_at(sched, idx, z)
    x_a, e_a = losses.predict(GaussianDenoiser(sched, mu, 0.3), z, idx, a, s, "x0")
    x_b, e_b = losses.predict(GaussianDenoiser(sched, mu, 0.3, "eps"), z, idx, a, s, "eps")
    x_c, e_c = losses.predict(GaussianDenoiser(sched, mu, 0.3, "v"), z, idx, a, s, "v")
    torch.testing.assert_close(x_a, x_b)
    torch.testing.assert_close(e_a, e_b)
    torch.testing.assert_close(x_a, x_c)
    torch.testing.assert_close(e_a, e_c)
    with pytest.raises(ValueError, match="prediction"):
        DenoisingLoss(sched, 8, 1, prediction="velocity")


# --------------------------------------------------------------------------- denoising


@pytest.mark.parametrize("kind", ["both", "x", "eps"])
@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (7, 3, 5, 3)])
def test_denoising_loss_matches_float64(kind, shape):
    x0_hat, eps_hat, x0, eps = (torch.randn(shape) for _ in range(4))
    eps_hat = eps_hat * torch.linspace(0.1, 3, shape[0]).view(-1, 1, 1, 1)  # mix of winners
    lx, le = ref_mse(x0_hat, x0), ref_mse(eps_hat, eps)
    want = {"x": lx, "eps": le, "both": torch.maximum(lx, le)}[kind]
    got = losses.denoising_loss(x0_hat, eps_hat, x0, eps, kind, reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.denoising_loss(x0_hat, eps_hat, x0, eps, kind).double(),
                               want.mean(), rtol=1e-5, atol=1e-6)


def test_denoising_loss_rejects_unknown_kind():
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="kind"):
        losses.denoising_loss(x, x, x, x, "l1")


@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_base_loss_matches_manual_draw(prediction):
    T, ts = 8, 2
    sched = cosine_schedule(T, ts)
    x0 = torch.rand(5, 1, 3, 7, dtype=F64) * 2 - 1
    model = GaussianDenoiser(sched, torch.zeros(1, 1, 3, 7, dtype=F64), 0.4, prediction)
    loss = DenoisingLoss(sched, T, ts, "both", prediction)
    got = loss(model, x0, *loss.draw(torch.Generator().manual_seed(3), x0)).loss
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, T + 1, (5,), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    a, s = sched.alpha[t * ts].view(-1, 1, 1, 1), sched.sigma[t * ts].view(-1, 1, 1, 1)
    z = a * x0 + s * eps
    x_hat = GaussianDenoiser(sched, torch.zeros(1, 1, 3, 7, dtype=F64), 0.4)(z, t * ts)
    e_hat = (z - a * x_hat) / s
    want = torch.maximum(ref_mse(x_hat, x0), ref_mse(e_hat, eps)).mean()
    torch.testing.assert_close(got, want)


def test_base_loss_is_zero_for_the_exact_denoiser_of_a_point():
    sched = cosine_schedule(16, 1)
    c = torch.rand(1, 2, 3, 3, dtype=F64) * 2 - 1
    objective, x0 = DenoisingLoss(sched, 16, 1), c.expand(6, -1, -1, -1)
    loss = objective(GaussianDenoiser(sched, c), x0, *objective.draw(None, x0)).loss
    assert loss.abs() < 1e-20


def test_base_loss_checks_the_schedule_size():
    with pytest.raises(ValueError, match="schedule"):
        DenoisingLoss(cosine_schedule(4, 1), 8, 1)


# --------------------------------------------------------------------------- PD target


def two_teacher_steps(teacher, z, t, sched, ts, prediction):
    """Reference: the teacher's two unclipped DDIM steps, one sample at a time, float64."""
    out = []
    for b in range(z.shape[0]):
        zb = z[b:b + 1]
        for step in (int(t[b]), int(t[b]) - 1):
            i, j = step * ts, (step - 1) * ts
            o = teacher(zb, torch.tensor([i]))
            a, s = sched.alpha[i], sched.sigma[i]
            x = o if prediction == "x0" else (zb - s * o) / a
            zb = sched.alpha[j] * x + sched.sigma[j] * (zb - a * x) / s
        out.append(zb)
    return torch.cat(out)


def ref_pd_target(teacher, x0, eps, t, sched, ts):
    """METHOD.md, "Progressive distillation target", from its equations in float64 (the
    teacher copied to float64): ``z_t = alpha_t x0 + sigma_t eps``; two unclipped teacher
    DDIM steps ``z_t -> z_{t-1} -> z_{t-2}``, each ``x_hat = teacher(z_k, k ts)``,
    ``eps_hat = (z_k - alpha_k x_hat) / sigma_k``, ``z_{k-1} = alpha_{k-1} x_hat + sigma_{k-1}
    eps_hat``; then ``r = sigma_{t-2} / sigma_t``, ``x_target = (z_{t-2} - r z_t) /
    (alpha_{t-2} - r alpha_t)``, ``eps_target = (z_t - alpha_t x_target) / sigma_t``.
    Returns ``(z_t, x_target, eps_target)``."""
    teacher = copy.deepcopy(teacher).double()

    def alpha(k):
        return sched.alpha[k * ts].view(-1, 1, 1, 1)

    def sigma(k):
        return sched.sigma[k * ts].view(-1, 1, 1, 1)

    z_t = alpha(t) * x0.double() + sigma(t) * eps.double()
    z = z_t
    with torch.no_grad():
        for k in (t, t - 1):
            x_hat = teacher(z, k * ts)
            eps_hat = (z - alpha(k) * x_hat) / sigma(k)
            z = alpha(k - 1) * x_hat + sigma(k - 1) * eps_hat
    r = sigma(t - 2) / sigma(t)
    x_target = (z - r * z_t) / (alpha(t - 2) - r * alpha(t))
    return z_t, x_target, (z_t - alpha(t) * x_target) / sigma(t)


@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_student_predicting_the_target_takes_the_teachers_two_steps_in_one(prediction):
    T, ts = 16, 4
    sched = cosine_schedule(T, ts)
    teacher = GaussianDenoiser(sched, torch.randn(1, 3, 5, 3, dtype=F64) * 0.3, 0.5, prediction)
    t = torch.tensor([2, 4, 10, 16, 6, 2, 12])
    a, s = schedule_at(sched, t * ts, t.double())
    z = torch.randn(7, 3, 5, 3, dtype=F64)
    x_target, eps_target = losses.pd_target(teacher, z, t, sched, ts, prediction)
    torch.testing.assert_close(a.view(-1, 1, 1, 1) * x_target + s.view(-1, 1, 1, 1) * eps_target, z)
    # a student (T/2, 2 ts) predicting x_target: one DDIM step from t/2 to t/2 - 1
    j = (t - 2) * ts  # the student's next index, (t/2 - 1) * 2ts
    a_s, s_s = sched.alpha[j].view(-1, 1, 1, 1), sched.sigma[j].view(-1, 1, 1, 1)
    one_step = a_s * x_target + s_s * (z - a.view(-1, 1, 1, 1) * x_target) / s.view(-1, 1, 1, 1)
    torch.testing.assert_close(one_step, two_teacher_steps(teacher, z, t, sched, ts, prediction))


def test_pd_target_of_a_point_is_the_point_and_its_noise():
    sched = cosine_schedule(8, 2)
    c = torch.rand(1, 1, 4, 4, dtype=F64) * 2 - 1
    t = torch.tensor([2, 4, 6, 8])
    a, s = schedule_at(sched, t * 2, c)
    eps = torch.randn(4, 1, 4, 4, dtype=F64)
    z = a.view(-1, 1, 1, 1) * c + s.view(-1, 1, 1, 1) * eps
    x_target, eps_target = losses.pd_target(GaussianDenoiser(sched, c), z, t, sched, 2)
    torch.testing.assert_close(x_target, c.expand_as(z))
    torch.testing.assert_close(eps_target, eps)


def test_pd_loss_outputs_and_gradients():
    T, ts = 8, 2
    sched = cosine_schedule(T, ts)
    teacher = TinyNet()
    student = copy.deepcopy(teacher)
    torch.nn.init.normal_(student.out.weight, std=0.1)
    x0 = torch.rand(6, 1, 5, 7) * 2 - 1
    g = torch.Generator().manual_seed(1)
    objective = PDLoss(teacher, sched, T, ts)
    t, noise = objective.draw(g, x0)
    out = objective(student, x0, t, noise)
    assert out.loss.dim() == 0 and out.x0_hat.shape == x0.shape
    assert torch.equal(out.t, t) and bool(((t % 2 == 0) & (t >= 2) & (t <= T)).all())
    assert not out.x_target.requires_grad and out.x0_hat.requires_grad
    z_t, want_x, want_eps = ref_pd_target(teacher, x0, noise, t, sched, ts)
    tol = dict(rtol=1e-5, atol=1e-5)  # fp32 against float64
    torch.testing.assert_close(out.z_t.double(), z_t, **tol)
    torch.testing.assert_close(out.x_target.double(), want_x, **tol)
    torch.testing.assert_close(out.eps_target.double(), want_eps, **tol)
    with torch.no_grad():  # the "both" loss of the student against that target
        x_s = copy.deepcopy(student).double()(z_t, t * ts)
    a, s = sched.alpha[t * ts].view(-1, 1, 1, 1), sched.sigma[t * ts].view(-1, 1, 1, 1)
    want = torch.maximum(ref_mse(x_s, want_x), ref_mse((z_t - a * x_s) / s, want_eps)).mean()
    torch.testing.assert_close(out.loss.double(), want, **tol)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="even"):
        PDLoss(teacher, sched, 7, ts)


# --------------------------------------------------------------------------- RCFD terms


@pytest.mark.parametrize("shape", [(1, 3), (7, 10), (123, 1000)])
def test_entropy_and_diversity_match_float64(shape):
    logits = torch.randn(shape) * 4
    torch.testing.assert_close(losses.entropy_loss(logits).double(), ref_entropy(logits),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.diversity_loss(logits).double(), ref_diversity(logits),
                               rtol=1e-5, atol=1e-6)


def test_entropy_and_diversity_are_stable_for_huge_logits():
    logits = torch.randn(9, 10) * 1e4
    logits[0] = 0.0
    logits[1, 3] = 1e4  # only that class survives the softmax
    logits.requires_grad_(True)
    ent, div = losses.entropy_loss(logits), losses.diversity_loss(logits)
    (ent + div).backward()
    assert torch.isfinite(ent) and torch.isfinite(div) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(ent.double(), ref_entropy(logits.detach()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(div.double(), ref_diversity(logits.detach()), rtol=1e-5, atol=1e-6)


def test_entropy_and_diversity_bounds():
    k = 10
    uniform = torch.zeros(4, k)
    one_hot = torch.eye(k) * 1e4
    torch.testing.assert_close(losses.entropy_loss(uniform), torch.tensor(math.log(k)))
    assert losses.entropy_loss(one_hot) < 1e-6
    torch.testing.assert_close(losses.diversity_loss(one_hot), torch.tensor(-math.log(k)))
    torch.testing.assert_close(losses.diversity_loss(one_hot[:1].expand(5, -1)), torch.tensor(0.0))


def test_rcfd_config_validates():
    with pytest.raises(ValueError, match="kl_on"):
        RCFDLossConfig(kl_on="pixels")
    with pytest.raises(ValueError, match="every term"):
        RCFDLossConfig(use_cfd=False, alpha=0.0)
    with pytest.raises(ValueError, match="beta"):
        RCFDLossConfig(beta=1.5)


def rcfd_case():
    x0_hat = (torch.randn(7, 1, 3, 5) * 2).requires_grad_(True)
    x_target = torch.randn(7, 1, 3, 5)
    return frozen(TinyClassifier(15)), x0_hat, x_target


def ref_terms(clf, x0_hat, x_target, cfg):
    ls, fs = clf(x0_hat)
    lt, ft = clf(x_target)
    s, t = (fs, ft) if cfg.kl_on == "features" else (ls, lt)
    cfd = ref_kl(s, t, cfg.tau, cfg.tau if cfg.dual_temperature else 1.0)
    ent, div = ref_entropy(ls), ref_diversity(ls)
    total = (cfd if cfg.use_cfd else 0) + cfg.alpha * (
        cfg.beta * (ent if cfg.use_ent else 0) + (1 - cfg.beta) * (div if cfg.use_div else 0))
    return {"cfd": cfd, "ent": ent, "div": div, "total": total}


SWITCHES = {
    "default": {},
    "use_cfd": {"use_cfd": False},
    "use_ent": {"use_ent": False},
    "use_div": {"use_div": False},
    "kl_on": {"kl_on": "logits"},
    "dual_temperature": {"dual_temperature": True},
}
# which logged term each switch changes; the total changes with every one
CHANGES = {"default": set(), "use_cfd": set(), "use_ent": set(), "use_div": set(),
           "kl_on": {"cfd"}, "dual_temperature": {"cfd"}}


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_rcfd_loss_matches_float64_and_each_switch_changes_its_term(switch):
    clf, x0_hat, x_target = rcfd_case()
    base_cfg = RCFDLossConfig(tau=0.9, alpha=0.5, beta=0.7)  # large alpha: every term counts
    cfg = base_cfg.replace(**SWITCHES[switch])
    total, terms = losses.rcfd_terms(clf, x0_hat, x_target, cfg)
    _, base_terms = losses.rcfd_terms(clf, x0_hat, x_target, base_cfg)
    want = ref_terms(clf, x0_hat.detach(), x_target, cfg)
    for name in ("cfd", "ent", "div", "total"):
        torch.testing.assert_close(terms[name].double(), want[name], rtol=1e-5, atol=1e-6)
        assert not terms[name].requires_grad
        changed = not torch.allclose(terms[name], base_terms[name], rtol=1e-6, atol=0)
        assert changed == (name in CHANGES[switch] or (name == "total" and switch != "default"))
    # the gradient is that of the float64 reference total
    (g,) = torch.autograd.grad(total, x0_hat)
    x64 = x0_hat.detach().double().requires_grad_(True)
    ref_total = ref_terms(copy.deepcopy(clf).double(), x64, x_target.double(), cfg)["total"]
    (g_ref,) = torch.autograd.grad(ref_total, x64)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-7)


def test_rcfd_distillation_gradients_reach_only_the_student():
    T, ts = 8, 2
    sched = cosine_schedule(T, ts)
    teacher = TinyNet()
    student = copy.deepcopy(teacher)
    clf = frozen(TinyClassifier(35))
    x0 = torch.rand(5, 1, 5, 7) * 2 - 1
    objective = RCFDLoss(PDLoss(teacher, sched, T, ts), clf)
    total, terms = objective(student, x0, *objective.draw(torch.Generator().manual_seed(0), x0))
    assert set(terms) >= {"cfd", "ent", "div", "reg", "pd"}
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in clf.parameters())
    assert sum(p.grad.abs().sum() for p in student.parameters()) > 0


def test_rcfd_loss_refuses_an_unfrozen_classifier():
    clf, x0_hat, x_target = rcfd_case()
    with pytest.raises(ValueError, match="requires_grad_"):
        RCFDLoss(PDLoss(TinyNet(), cosine_schedule(8, 1), 8, 1), clf.requires_grad_(True))
    with pytest.raises(ValueError, match="eval"):
        RCFDLoss(PDLoss(TinyNet(), cosine_schedule(8, 1), 8, 1), frozen(clf).train())


# --------------------------------------------------------------------------- optimisation


def run_steps(loss_fn, model, steps=30, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    hist = []
    for _ in range(steps):
        loss = loss_fn(g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(loss.item())
    return sum(hist[:8]) / 8, sum(hist[-8:]) / 8


def test_base_and_pd_losses_decrease_on_a_tiny_model():
    T = 16
    sched = cosine_schedule(T, 1)
    x0 = (torch.rand(8, 1, 5, 5) > 0.5).float() * 2 - 1
    model = TinyNet(width=8)
    base = DenoisingLoss(sched, T, 1)
    first, last = run_steps(lambda g: base(model, x0, *base.draw(g, x0)).loss, model)
    assert last < 0.7 * first
    teacher = frozen(model)
    student = TinyNet(width=8)
    pd = PDLoss(teacher, sched, T, 1)
    first, last = run_steps(lambda g: pd(student, x0, *pd.draw(g, x0)).loss, student)
    assert last < 0.7 * first
