"""The loop's plug-in contract: a job's own ``state`` (a target network, a buffer) is saved
with its training state and restored exactly on resume; ``after_step`` runs once per
applied optimiser step, after the EMA, with the step count; the public EMA update is the
loop's own; a loss object holding a frozen target network compiles as one region and reads
the target's in-place updates; ``train_unit`` skips a finished unit."""

import copy
import math

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from rcfd.errors import Interrupted, ResumeError
from rcfd.io.files import read_jsonl
from rcfd.losses import LossOutput
from rcfd.methods.common import train_unit
from rcfd.training import optim
from rcfd.training.ema import ema_update_
from rcfd.training.fast_step import ObjectiveStep
from rcfd.training.loop import Job, StepInfo, run_job
from rcfd.training.optim import EMA, OptimSpec
from rcfd.training.rundir import RunContext, checkpoint_path, metrics_path, state_path

pytestmark = pytest.mark.usefixtures("one_thread")


class Data:
    """Regression batches that depend only on their position (resumable)."""

    batch_size = 8

    def __init__(self):
        self.pos = 0

    def __next__(self):
        g = torch.Generator().manual_seed(1000 + self.pos)
        self.pos += 1
        x = torch.randn(8, 4, generator=g)
        return x, x.sum(1, keepdim=True).sin()

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


class Counter(nn.Module):
    """A buffer-only module: how many times ``after_step`` ran."""

    def __init__(self):
        super().__init__()
        self.register_buffer("n", torch.zeros((), dtype=torch.int64))


def make_job(calls=None, nan_at=None, steps=16, decay=0.8):
    """A job whose loss pulls the student towards an EMA target network that ``after_step``
    updates; dropout uses the global RNG, so a resume must restore it too."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))
    target = copy.deepcopy(student).requires_grad_(False)
    counter = Counter()
    saved = {}

    def loss_fn(net, x, y, info):
        pred = net(x)
        loss = (pred - y).square().mean() + 0.5 * (pred - target(x)).square().mean()
        if nan_at is not None and info.step + 1 == nan_at:
            loss = loss * math.nan
        return loss, {"pull": (pred - target(x)).square().mean()}

    def after_step(done, net):
        assert net is student  # the unwrapped student
        ema_update_(target, net, decay)
        counter.n += 1
        if calls is not None:
            calls.append(done)

    def finalize(net, ema_net, extra, path):
        saved.update(student={k: v.clone() for k, v in net.state_dict().items()},
                     ema={k: v.clone() for k, v in ema_net.state_dict().items()})
        return path

    job = Job(stage="plug", unit="model", model=student, loss_fn=loss_fn, batches=Data(),
              steps=steps, optim=OptimSpec("adam", 1e-2), config={"decay": decay},
              finalize=finalize, ema_decay=0.9, log_interval=1, checkpoint_interval=1000,
              state={"target": target, "counter": counter}, after_step=after_step)
    return job, target, counter, saved


def run_ctx(path, **kw):
    return RunContext(path, device="cpu", progress=False, **kw)


def logged(run_dir):
    return [{k: v for k, v in r.items() if k != "time"}
            for r in read_jsonl(metrics_path(run_dir, "plug", "model"))]


def test_method_state_resumes_bit_exactly(tmp_path):
    """16 steps straight vs 8 + stop + resume 8: the same student, EMA, target network,
    counter and logged losses, bit for bit."""
    job, target_a, counter_a, saved_a = make_job()
    run_job(job, run_ctx(tmp_path / "a"))
    job, _, _, _ = make_job()
    with pytest.raises(Interrupted):
        run_job(job, run_ctx(tmp_path / "b", resume=True, stop_after=8))
    held = torch.load(state_path(tmp_path / "b", "plug", "model"), weights_only=True)
    assert set(held["method_state"]) == {"target", "counter"}
    assert int(held["method_state"]["counter"]["n"]) == 8
    job, target_b, counter_b, saved_b = make_job()  # a fresh process: fresh modules
    run_job(job, run_ctx(tmp_path / "b", resume=True))
    assert int(counter_a.n) == int(counter_b.n) == 16
    for key in ("student", "ema"):
        assert all(torch.equal(saved_a[key][k], saved_b[key][k]) for k in saved_a[key]), key
    sa, sb = target_a.state_dict(), target_b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["0.weight"], make_job()[1].state_dict()["0.weight"])  # it moved
    assert logged(tmp_path / "a") == logged(tmp_path / "b")


def test_resume_refuses_a_state_of_other_modules(tmp_path):
    job, *_ = make_job()
    with pytest.raises(Interrupted):
        run_job(job, run_ctx(tmp_path, resume=True, stop_after=3))
    job, *_ = make_job()
    job.state = {"target": job.state["target"]}
    with pytest.raises(ResumeError, match=r"method state \['counter', 'target'\] but this job "
                                          r"keeps \['target'\]"):
        run_job(job, run_ctx(tmp_path, resume=True))


def test_after_step_once_per_applied_step_after_the_ema(tmp_path, monkeypatch):
    """Called with the step count after each applied step, not after a skipped non-finite
    one, and after the loop's EMA update."""
    calls, order = [], []
    real = optim.EMA.update
    monkeypatch.setattr(optim.EMA, "update", lambda self, m: (order.append("ema"), real(self, m)))
    job, _, counter, _ = make_job(calls=calls, nan_at=3, steps=6)
    inner = job.after_step
    job.after_step = lambda done, net: (order.append("after"), inner(done, net))
    run_job(job, run_ctx(tmp_path, skip_nonfinite=1))
    assert calls == [1, 2, 4, 5, 6] and int(counter.n) == 5
    assert order == ["ema", "after"] * 5


def test_ema_update_is_the_loops_ema_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))
    model(torch.randn(7, 3))  # running statistics in the buffers
    ema = EMA(model, 0.75)
    mine = copy.deepcopy(ema.model)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(7, 3))
        ema.update(model)
        ema_update_(mine, model, 0.75)
    a, b = ema.model.state_dict(), mine.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(b["1.running_mean"], model.state_dict()["1.running_mean"])  # copied
    w = mine[0].weight
    assert w.grad_fn is None and not w.requires_grad
    before = w.clone()
    ema_update_(mine, model, 1.0)  # decay 1 keeps the target
    assert torch.equal(w, before)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        ema_update_(mine, model, 1.5)
    with pytest.raises(ValueError, match="must have the source's parameters"):
        ema_update_(mine, nn.Linear(3, 5), 0.5)


class TargetLoss:
    """A loss object shaped like rcfd.losses' (``draw`` + ``__call__``) that holds a frozen
    target network: the student's output is pulled towards the target's."""

    def __init__(self, target):
        self.target = target

    def draw(self, generator, x0, global_batch, rows):
        noise = torch.randn(x0.shape, generator=generator)
        return torch.zeros(len(x0), dtype=torch.long), noise

    def __call__(self, model, x0, t, noise):
        with torch.no_grad():
            want = self.target(x0 + 0.1 * noise)
        loss = (model(x0 + 0.1 * noise) - want).square().mean()
        return LossOutput(loss, {"distance": loss.detach()})


def steps_with_target(compiled: bool, counter=None):
    """Three steps of a student against a target updated in place after each."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 4))
    target = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        for p in target.parameters():
            p.mul_(0.5)
    step = ObjectiveStep(TargetLoss(target))
    if compiled:
        step = step.compiled(counter, region="test-target-network")
    info = StepInfo(0, torch.Generator().manual_seed(3), 0, 1, 6)
    x0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    out = []
    for _ in range(3):
        student.zero_grad(set_to_none=True)
        loss, terms = step(student, x0, None, info)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
        with torch.no_grad():
            for p in student.parameters():
                p.sub_(0.1 * p.grad)
        ema_update_(target, student, 0.5)
    assert step.objective.target is target  # never copied
    assert all(p.grad is None for p in target.parameters())  # never trained
    return out


def test_a_frozen_target_network_compiles_as_one_region():
    counter = CompileCounterWithBackend("aot_eager")
    eager, compiled = steps_with_target(False), steps_with_target(True, counter)
    assert counter.frame_count == 1  # one region, no recompile after the in-place updates
    assert not torch.equal(eager[0][0], eager[2][0])  # the target's updates change the loss
    for (le, ge), (lc, gc) in zip(eager, compiled):
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-7)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_trainable_network_in_the_objective_is_refused():
    with pytest.raises(ValueError, match=r"network\(s\) \['target'\] have parameters that "
                                         "require gradients"):
        ObjectiveStep(TargetLoss(nn.Linear(4, 4)))


def test_train_unit_skips_a_finished_unit(tmp_path, capsys):
    job, *_ = make_job(steps=2)
    built = []

    def build():
        built.append(1)
        return job
    run = run_ctx(tmp_path)
    assert train_unit(run, "plug", "model", build) == checkpoint_path(tmp_path, "plug", "model")
    checkpoint_path(tmp_path, "plug", "model").write_bytes(b"")  # finalize wrote no file here
    again = train_unit(run_ctx(tmp_path, resume=True), "plug", "model",
                       lambda: pytest.fail("a finished unit was built again"))
    assert again == checkpoint_path(tmp_path, "plug", "model") and built == [1]
    assert "plug/model is finished; using" in capsys.readouterr().err
    with pytest.raises(ValueError, match="was given a job for 'plug'/'model'"):
        train_unit(run_ctx(tmp_path / "other"), "plug", "other", lambda: job)
