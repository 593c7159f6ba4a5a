"""The ``cd`` method: trained through train_unit with its target network as the job's own
state (16 steps straight = 8 + stop + resume 8, bit for bit, target included), its rows
sampled with the consistency sampler, its config checks, and a smoke run of its stage in the
pipeline that puts CD rows in results.md."""

import json

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from rcfd.cli import train
from rcfd.core.consistency import adaptive_N
from rcfd.core.schedule import cosine_schedule
from rcfd.core.unet import UNet, UNetConfig
from rcfd.data import DatasetSpec
from rcfd.errors import Interrupted
from rcfd.io.checkpoint import load_diffusion_checkpoint, load_model_file, save_diffusion_checkpoint
from rcfd.methods import registry
from rcfd.methods.cd import CDStageConfig, make_cd_job, step_schedule
from rcfd.methods.cd_loss import CDLoss, CDStep
from rcfd.methods.common import train_unit
from rcfd.report import results as report
from rcfd.study.pipeline import comparisons
from rcfd.study.presets import get_preset
from rcfd.training.ema import ema_update_
from rcfd.training.fast_step import ObjectiveStep
from rcfd.training.loop import StepInfo
from rcfd.training.rundir import RunContext, checkpoint_path, state_path

pytestmark = pytest.mark.usefixtures("one_thread")

T = 16
SPEC = DatasetSpec(name="digits", image_size=8)
CFG = CDStageConfig(N=9, steps=16, batch_size=16, lr=1e-3, mu=0.9, checkpoint_interval=4,
                    log_interval=1, flip=False)


def write_base(run_dir):
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1,), attn=(),
                          num_res_blocks=1, dropout=0.0, num_time_indices=T + 1))
    path = checkpoint_path(run_dir, "base", "model")
    path.parent.mkdir(parents=True)
    save_diffusion_checkpoint(path, net, T=T, time_scale=1)
    return net


def run_ctx(path, **kw):
    return RunContext(path, device="cpu", progress=False, **kw)


ADAPTIVE = CFG.model_copy(update=dict(schedule="adaptive", s0=2, s1=8, mu0=0.8))


def train_cd_unit(run_dir, cfg=CFG, **kw):
    """``cd/model`` through train_unit; returns its path and the job's target network."""
    jobs = []

    def make():
        jobs.append(make_cd_job(cfg, checkpoint_path(run_dir, "base", "model"), SPEC,
                                run_ctx(run_dir, **kw)))
        return jobs[-1]
    try:
        return train_unit(run_ctx(run_dir, **kw), "cd", "model", make), jobs[-1].state["target"]
    finally:
        assert len(jobs) == 1


@pytest.mark.parametrize("cfg", [CFG, ADAPTIVE], ids=["fixed", "adaptive"])
def test_cd_resumes_bit_exactly_with_its_target_network(tmp_path, cfg):
    a, b = tmp_path / "a", tmp_path / "b"
    base = write_base(a)
    write_base(b)
    path_a, target_a = train_cd_unit(a, cfg)
    with pytest.raises(Interrupted):
        train_cd_unit(b, cfg, resume=True, stop_after=8)
    held = torch.load(state_path(b, "cd", "model"), weights_only=True)
    target_8 = held["method_state"]["target"]
    path_b, target_b = train_cd_unit(b, cfg, resume=True)
    ca, cb = load_model_file(path_a), load_model_file(path_b)
    assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])
    sa, sb = target_a.state_dict(), target_b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(p.requires_grad for p in target_a.parameters())
    # the target moved, and it is the EMA (mu=0.9) of the student, not the student
    trained = [k for k, p in target_a.named_parameters()
               if not torch.equal(ca["state_dict"][k], base.state_dict()[k])]
    assert trained
    w = trained[0]
    assert not torch.equal(sa[w], base.state_dict()[w]) and not torch.equal(sa[w], target_8[w])
    assert not torch.equal(sa[w], ca["state_dict"][w])
    model, info = load_diffusion_checkpoint(path_a)
    assert (info.T, info.time_scale, info.prediction) == (T, 1, "x0")
    assert info.extra["consistency"]["sigma_data"] == 0.5 and info.extra["steps"] == 16


def test_adaptive_schedule_drives_the_grid_and_the_target_decay(tmp_path):
    """Step k trains on the N(k)-point grid (n within 0..N(k)-2) and the target decays
    with mu(N(k)); the fixed schedule keeps N and mu."""
    write_base(tmp_path)
    job = make_cd_job(ADAPTIVE, checkpoint_path(tmp_path, "base", "model"), SPEC,
                      run_ctx(tmp_path))
    N_at, mu_after = step_schedule(ADAPTIVE)
    assert [N_at(k) for k in (0, 8, 15, 16)] == [2, 7, 9, 9]  # sqrt(k/16 (81 - 4) + 4)
    assert mu_after(1) == pytest.approx(0.8) and mu_after(16) == pytest.approx(0.8 ** (2 / 9))
    student, x0 = job.model, torch.rand(64, 1, 8, 8) * 2 - 1
    seen = {}
    for k in (0, 8, 15):
        info = StepInfo(k, torch.Generator().manual_seed(k), 0, 1, 64)
        job.loss_fn(student, x0, None, info)
        loss = job.loss_fn.objective
        seen[k] = (loss.N, loss.grid.tolist())
        n, _ = loss.draw(torch.Generator().manual_seed(k), x0)
        assert int(n.max()) <= loss.N - 2
    assert seen[0] == (2, [0, T]) and seen[8][0] == 7 and seen[15] == (9, list(range(0, T + 1, 2)))
    fixed = make_cd_job(CFG, checkpoint_path(tmp_path, "base", "model"), SPEC, run_ctx(tmp_path))
    assert type(fixed.loss_fn) is ObjectiveStep and fixed.loss_fn.objective.N == CFG.N
    with pytest.raises(ValueError, match=r"cd.s1 \+ 1=81 needs N - 1 <= base.T=64"):
        get_preset("digits").with_overrides({"cd.schedule": "adaptive", "cd.s1": 80})


def test_cd_config_checks_and_rows():
    cd = registry.get("cd")
    cfg = get_preset("digits")
    view = cd.view(cfg)
    assert [(r.label, r.steps, r.sampler, r.key) for r in cd.rows(view)] == [
        ("CD", 1, "consistency", "cd/consistency"), ("CD", 2, "consistency", "cd/consistency")]
    assert cd.compare_to == "pd" and cfg.cd.N == 18
    with pytest.raises(ValueError, match="cd.N=80 needs N - 1 <= base.T=64"):
        cfg.with_overrides({"cd.N": 80})
    assert get_preset("cifar10-paper").cd.steps == 800_000
    assert get_preset("cifar10-paper-densenet201").cd is None


def test_cd_stage_in_a_smoke_pipeline(tmp_path):
    """the smoke preset shrunk, its evaluation limited to the PD and CD rows."""
    out = tmp_path / "run"
    sets = ["distill_classifier.steps=2", "eval_classifier.steps=2", "base.steps=2",
            "pd.steps_per_round=1", "pd.long_round_steps=1", "rcfd.steps_per_round=1",
            "rcfd.long_round_steps=1", "eval.num_samples=20", "eval.steps=[1,2]",
            "eval.batch_size=20", "eval.methods=[pd,cd]", "threads=1"]
    argv = ["--device", "cpu", "--no-progress", "--preset", "smoke", "--out", str(out)]
    assert train.main(argv + [x for s in sets for x in ("--set", s)]) == 0
    results = json.loads((out / report.RESULTS_JSON).read_text())
    got = {(e["key"], e["steps"]) for e in results["entries"]}
    assert {("cd/consistency", 1), ("cd/consistency", 2)} <= got
    md = (out / report.RESULTS_MD).read_text()
    assert report.results_table(results) in md
    assert any(line.lstrip("| ").startswith("CD") for line in md.splitlines()), md
    assert checkpoint_path(out, "cd", "model").is_file()
    # its training-time grid (one-step consistency samples) and its evaluation grids
    assert list((out / "cd").glob("model_step*.png"))
    grids = {e["key"]: e["grid"] for e in results["entries"] if e["key"] == "cd/consistency"}
    assert grids and all((out / g).is_file() for g in grids.values())
    assert results["side_by_side"] and (out / results["side_by_side"]).is_file()


class ConvNet(torch.nn.Module):
    """A tiny time-conditioned ``(z, index) -> x0_hat``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.emb = torch.nn.Embedding(T + 1, 1)

    def forward(self, z, index):
        return self.conv(z) + self.emb(index).view(-1, 1, 1, 1)


def test_cd_objective_compiles_as_one_region_and_reads_target_updates():
    """The CD loss with its frozen teacher and target compiles (on the CPU the schedule's
    index check splits it, as it does PD's), is not recompiled after the target's in-place
    EMA updates, and agrees with the eager step."""
    def run(counter=None):
        torch.manual_seed(0)
        student, teacher = ConvNet(), ConvNet().requires_grad_(False)
        target = ConvNet().requires_grad_(False)
        target.load_state_dict(student.state_dict())
        step = ObjectiveStep(CDLoss(teacher, target, cosine_schedule(T, 1), T, 1, 9))
        if counter is not None:
            step = step.compiled(counter, region="test-cd")
        info = StepInfo(0, torch.Generator().manual_seed(3), 0, 1, 6)
        x0 = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(4)) * 2 - 1
        out, frames = [], []
        for _ in range(3):
            student.zero_grad(set_to_none=True)
            loss, _ = step(student, x0, None, info)
            frames.append(None if counter is None else counter.frame_count)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
            with torch.no_grad():
                for p in student.parameters():
                    p.sub_(0.5 * p.grad)
            ema_update_(target, student, 0.5)
        assert counter is None or frames[0] == frames[2] > 0, frames
        return out

    counter = CompileCounterWithBackend("aot_eager")
    eager, compiled = run(), run(counter)
    assert eager[0][0] > 0 and not torch.equal(eager[1][0], eager[2][0])
    for (le, ge), (lc, gc) in zip(eager, compiled):
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-7)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_studies_pair_cd_rows_with_pd_by_their_row_key():
    pairs = comparisons(get_preset("digits"))
    assert ("cd/consistency", "pd") in pairs and ("rcfd", "pd") in pairs
    assert ("cd", "pd") not in pairs  # the method name is not a row key of the results


def test_adaptive_cd_step_compiles_once_more_as_N_grows():
    """With N(k) changing every few steps the compiled step recompiles once (the grid's
    length becomes dynamic), not once per N, so it stays under Dynamo's recompile limit."""
    torch.manual_seed(0)
    student, teacher = ConvNet(), ConvNet().requires_grad_(False)
    target = ConvNet().requires_grad_(False)
    loss = CDLoss(teacher, target, cosine_schedule(T, 1), T, 1, 17)
    counter = CompileCounterWithBackend("aot_eager")
    step = CDStep(loss, lambda k: adaptive_N(k, 30, 2, 16)).compiled(counter, region="test-cd-adaptive")
    x0 = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(4)) * 2 - 1
    frames, Ns = [], set()
    for k in range(30):
        out, _ = step(student, x0, None, StepInfo(k, torch.Generator().manual_seed(k), 0, 1, 6))
        out.backward()
        frames.append(counter.frame_count)
        Ns.add(loss.N)
    assert len(Ns) >= 10 and frames[-1] == frames[6] and frames[-1] - frames[0] <= 1, frames
