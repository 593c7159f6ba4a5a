"""Objective diagnostics (rcfd.evaluation.objectives): the held-out draws are fixed by the
seed and fingerprinted, t is drawn as in training, and a student's PD and CFD losses (and
its teacher's in its place) equal float64 references written from METHOD.md's equations."""

import copy
from types import SimpleNamespace

import pytest
import torch
from standins import TinyNet
from test_losses import TinyClassifier, frozen, ref_kl, ref_mse, ref_pd_target

from rcfd.core.schedule import cosine_schedule
from rcfd.data import ImageDataset
from rcfd.evaluation.objectives import (
    DIAGNOSTIC_SAMPLES,
    held_out_draws,
    objective_losses,
    student_losses,
    teacher_side,
)
from rcfd.losses import PDLoss, RCFDLoss, RCFDLossConfig

T, TS = 8, 2


def images(n=40, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    return ImageDataset(x, None, 0, "toy", "test")


def info(T=T, time_scale=TS):
    """What the diagnostics read of a teacher's DiffusionInfo."""
    return SimpleNamespace(T=T, time_scale=time_scale, prediction="x0")


def test_draws_are_fixed_by_the_seed_and_fingerprinted():
    data = images()
    a, b, c = held_out_draws(data, 3), held_out_draws(data, 3), held_out_draws(data, 4)
    assert a.x0.shape == (40, 1, 5, 5) and a.u.shape == (40,)  # fewer images than 512: all of them
    assert all(torch.equal(x, y) for x, y in ((a.x0, b.x0), (a.u, b.u), (a.noise, b.noise)))
    assert a.fingerprint == b.fingerprint != c.fingerprint and len(a.fingerprint) == 16
    assert sorted(a.x0.flatten(1).tolist()) == sorted(data.to_float().flatten(1).tolist())  # a permutation
    assert held_out_draws(images(2000), 0).x0.shape[0] == DIAGNOSTIC_SAMPLES
    assert held_out_draws(data, 3, num=7).x0.shape[0] == 7


def test_t_is_the_training_draw_shared_by_every_student_of_a_teacher():
    """t = 2 (1 + floor(u T/2)): even, in 2..T, about uniform (as PDLoss.draw), and one u
    gives one t per teacher T."""
    d = held_out_draws(images(2000, size=2), 0, num=2000)
    for teacher_T in (2, 4, 16, 64):
        t = d.t(teacher_T)
        assert t.dtype == torch.int64 and bool(((t % 2 == 0) & (t >= 2) & (t <= teacher_T)).all())
        counts = torch.bincount(t // 2 - 1, minlength=teacher_T // 2).double()
        assert counts.min() > 0.7 * counts.mean() and torch.equal(d.t(teacher_T), t)
    assert bool((d.t(2) == 2).all())
    edge = type(d)(d.x0[:2], torch.tensor([0.0, 1 - 1e-16], dtype=torch.float64), d.noise[:2])
    assert edge.t(8).tolist() == [2, 8]


def test_pd_score_of_a_shared_target_is_the_loss_bit_for_bit():
    teacher, student = TinyNet(), TinyNet()
    pd = PDLoss(teacher, cosine_schedule(T, TS), T, TS)
    x0 = torch.rand(6, 1, 5, 5) * 2 - 1
    t, noise = pd.draw(torch.Generator().manual_seed(0), x0)
    objective = RCFDLoss(pd, frozen(TinyClassifier(25)), RCFDLossConfig())
    with torch.no_grad():
        target = pd.target(x0, t, noise)
        assert torch.equal(pd.score(student, target).loss, pd(student, x0, t, noise).loss)
        a, b = objective.score(student, target), objective(student, x0, t, noise)
    assert torch.equal(a.loss, b.loss) and all(torch.equal(a.terms[k], b.terms[k]) for k in a.terms)


@pytest.mark.parametrize("dual", [False, True])
def test_student_and_teacher_losses_match_float64(dual):
    """The row of a student: its PD loss ("both") and CFD loss against its teacher's
    two-step target, and the teacher's own in the student's place (the student at
    initialisation), against float64 references."""
    torch.manual_seed(0)
    teacher = frozen(TinyNet())
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.out.weight.add_(0.1 * torch.randn_like(student.out.weight))
    clf = frozen(TinyClassifier(25))
    cfg = RCFDLossConfig(tau=0.9, dual_temperature=dual)
    draws = held_out_draws(images(), 1)
    got = objective_losses(student, teacher, info(), clf, cfg, draws)
    assert got["draws"] == draws.fingerprint
    sched = cosine_schedule(T, TS)
    t = draws.t(T)
    z_t, x_target, eps_target = ref_pd_target(teacher, draws.x0, draws.noise, t, sched, TS)
    a, s = sched.alpha[t * TS].view(-1, 1, 1, 1), sched.sigma[t * TS].view(-1, 1, 1, 1)
    clf64 = copy.deepcopy(clf).double()
    for name, model in (("student", student), ("teacher", teacher)):
        with torch.no_grad():
            x_hat = copy.deepcopy(model).double()(z_t, t * TS)
            pd = torch.maximum(ref_mse(x_hat, x_target), ref_mse((z_t - a * x_hat) / s, eps_target)).mean()
            cfd = ref_kl(clf64(x_hat)[1], clf64(x_target)[1], cfg.tau, cfg.tau if dual else 1.0)
        assert got[name]["pd"] == pytest.approx(float(pd), rel=1e-4, abs=1e-7), name
        assert got[name]["cfd"] == pytest.approx(float(cfd), rel=1e-4, abs=1e-7), name
    assert got["student"]["pd"] > got["teacher"]["pd"] > 0  # the teacher is not its own target


def test_a_teacher_side_serves_each_of_its_students():
    teacher = frozen(TinyNet())
    students = [copy.deepcopy(teacher) for _ in range(2)]
    with torch.no_grad():
        students[1].out.bias.add_(0.3)
    clf, cfg, draws = frozen(TinyClassifier(25)), RCFDLossConfig(), held_out_draws(images(), 0)
    side = teacher_side(teacher, info(), clf, cfg, draws)
    rows = [student_losses(side, s) for s in students]
    assert rows == [objective_losses(s, teacher, info(), clf, cfg, draws) for s in students]
    assert rows[0]["student"] == rows[0]["teacher"]  # a student equal to its teacher
    assert rows[1]["student"]["pd"] > rows[1]["teacher"]["pd"]
