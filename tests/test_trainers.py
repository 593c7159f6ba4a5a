"""The four trainers end to end on tiny CPU configurations, and the shared loop's contracts
(objectives equal to rcfd.losses, frozen classifier, refusal, non-finite handling)."""

import dataclasses
import math
import os

import pytest
import torch

from rcfd import losses
from rcfd.io.checkpoint import DiffusionInfo, load_diffusion_checkpoint
from rcfd.core.classifiers import ClassifierConfig, build, frozen
from rcfd.core.unet import UNetConfig
from rcfd.data import DatasetSpec, load_dataset
from rcfd.errors import NonFiniteLossError, StageExistsError
from rcfd.losses import draw_noise
from rcfd.methods.base import BaseStageConfig, train_base
from rcfd.methods.classifier import (
    ClassifierStageConfig,
    accuracy,
    load_classifier,
    train_classifier,
)
from rcfd.methods.common import TrainOptions
from rcfd.methods.distill import check_halving
from rcfd.methods.pd import PDStageConfig, train_pd
from rcfd.methods.rcfd import RCFDStageConfig, check_classifier_fits, train_rcfd
from rcfd.training import threads
from rcfd.io.files import read_jsonl
from rcfd.io.modelfile import load_model_file
from rcfd.training.loop import Job, StepInfo, run_job
from rcfd.training.optim import EMA, OptimSpec, lr_at
from rcfd.training.rundir import RunContext, metrics_path

CPU = TrainOptions(bf16=False, channels_last=False, fused=False, compile=False)
DATA = DatasetSpec(name="digits", image_size=8)  # the original 8x8 digits: no resize
UNET = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1,), attn=(), num_res_blocks=1,
                  dropout=0.0, num_time_indices=9)


pytestmark = pytest.mark.usefixtures("one_thread")


def base_cfg(**kw):
    d = dict(unet=UNET, T=8, lr=2e-3, warmup=5, batch_size=32, steps=80, ema_decay=0.9,
             sample_interval=10 ** 6, num_sample_images=4, checkpoint_interval=1000,
             log_interval=1, options=CPU)
    return BaseStageConfig(**{**d, **kw})


def distill_cfg(cls=PDStageConfig, **kw):
    d = dict(final_T=4, steps_per_round=40, long_round_steps=40, lr=5e-4, batch_size=32,
             sample_interval=10 ** 6, num_sample_images=4, checkpoint_interval=1000,
             log_interval=1, options=CPU)
    return cls(**{**d, **kw})


def clf_cfg(**kw):
    d = dict(arch="resnet18", width=8, epochs=None, steps=40, batch_size=64, lr=0.05,
             autoaugment=False, eval_interval=20, log_interval=1, options=CPU)
    return ClassifierStageConfig(**{**d, **kw})


def mean_loss(path, key="loss", rows=slice(None)):
    vals = [r[key] for r in read_jsonl(path) if key in r][rows]
    return sum(vals) / len(vals)


# The mean loss of a distillation round's last 10 steps over its first 10's must fall below
# this. Measured (seeded, deterministic): 0.13 for PD 8 -> 4 and 0.07 for RCFD 8 -> 4; with
# weights that do not move (lr = 1e-12) 1.07 and 0.95, which
# test_a_student_that_does_not_move_fails_the_decrease_check keeps above it.
LOSS_DROP = 0.5


def loss_ratio(path, n=10):
    """Mean logged loss of the last ``n`` steps over that of the first ``n``."""
    return mean_loss(path, rows=slice(-n, None)) / mean_loss(path, rows=slice(0, n))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny lineage shared by the tests: classifier, base (T=8), PD round 8 -> 4."""
    run = RunContext(tmp_path_factory.mktemp("run"), device="cpu", progress=False)
    clf = train_classifier(clf_cfg(), DATA, run)
    base = train_base(base_cfg(), DATA, run)
    return run, base, clf


# --------------------------------------------------------------------------- noise


def test_noise_shards_tile_the_global_batch():
    x = torch.zeros(8, 1, 4, 4)
    whole = draw_noise(torch.Generator().manual_seed(1), x, 0, 9)
    infos = [StepInfo(0, torch.Generator().manual_seed(1), r, 4, 8) for r in range(4)]
    parts = [draw_noise(i.generator, x[:2], 0, 9, i.global_batch, i.rows) for i in infos]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])


def test_lr_schedules():
    total = 100
    warm = OptimSpec(lr=1.0, warmup=10)
    assert lr_at(warm, 0, total) == pytest.approx(0.1) and lr_at(warm, 50, total) == 1.0
    cos = OptimSpec(lr=2.0, schedule="cosine")
    assert lr_at(cos, 0, total) == 2.0 and lr_at(cos, 50, total) == pytest.approx(1.0)
    assert lr_at(cos, total - 1, total) < 1e-3 * 2.0
    ms = OptimSpec(kind="sgd", lr=0.1, schedule="multistep", milestones=(0.5, 0.75))
    assert [lr_at(ms, s, total) for s in (49, 50, 74, 75)] == pytest.approx(
        [0.1, 0.01, 0.01, 0.001])


def test_ema_is_a_lerp_towards_the_model():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    ema = EMA(m, 0.75)
    before = ema.model.weight.clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    torch.testing.assert_close(ema.model.weight, 0.75 * before + 0.25 * m.weight)
    assert not ema.model.weight.requires_grad


# --------------------------------------------------------------------------- trainers


def test_base_trains_and_its_loss_decreases(trained):
    run, base, _ = trained
    log = metrics_path(run.run_dir, "base", "model")
    assert mean_loss(log, rows=slice(-20, None)) < 0.7 * mean_loss(log, rows=slice(0, 20))
    _, info = load_diffusion_checkpoint(base)
    assert (info.T, info.time_scale, info.weights) == (8, 1, "ema_state_dict")
    assert info.extra["finished"] and info.extra["steps"] == 80
    assert list(run.run_dir.glob("base/model_step*.png"))  # the final grid
    assert not (run.run_dir / "base" / "model.train.pt").exists()


def test_pd_rounds_halve_and_their_loss_decreases(trained):
    run, base, _ = trained
    paths = train_pd(distill_cfg(final_T=2), base, DATA, run)
    assert [p.name for p in paths] == ["T4.safetensors", "T2.safetensors"]
    infos = [load_diffusion_checkpoint(p)[1] for p in paths]
    assert [(i.T, i.time_scale) for i in infos] == [(4, 2), (2, 4)]
    assert infos[1].extra["teacher"] == str(paths[0])
    assert loss_ratio(metrics_path(run.run_dir, "pd", "T4")) < LOSS_DROP


def test_pd_student_starts_from_the_teacher_ema(trained, tmp_path):
    run, base, _ = trained
    run2 = dataclasses.replace(run, run_dir=tmp_path)
    (p,) = train_pd(distill_cfg(final_T=4, steps_per_round=1, lr=1e-12), base, DATA, run2)
    teacher, _ = load_diffusion_checkpoint(base)  # its EMA weights
    student, _ = load_diffusion_checkpoint(p)
    for (k, a), b in zip(teacher.state_dict().items(), student.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0, msg=k)


def test_classifier_beats_chance_and_rebuilds(tmp_path):
    run = RunContext(tmp_path, device="cpu", progress=False)
    data = DatasetSpec(name="digits")
    path = train_classifier(clf_cfg(steps=120, eval_interval=40), data, run)
    test = load_dataset(data, "test")
    model = load_classifier(path)
    acc = accuracy(model, test, torch.device("cpu"))
    assert acc > 3 / test.num_classes  # well above chance
    ckpt = load_model_file(path)
    assert ckpt["extra"]["test_accuracy"] == acc and ckpt["extra"]["role"] == "distill"
    assert any("val_acc" in r for r in read_jsonl(metrics_path(tmp_path, "classifier", "distill")))
    assert 0 <= ckpt["extra"]["accuracy"] <= 1  # validation accuracy: what chose the weights


def test_rcfd_round_runs_logs_every_term_and_decreases(trained):
    run, base, clf = trained
    cfg = distill_cfg(RCFDStageConfig, start_T=8, final_T=4, steps_per_round=40, lr=1e-3)
    (path,) = train_rcfd(cfg, base, clf, DATA, run)
    assert load_diffusion_checkpoint(path)[1].T == 4
    log = metrics_path(run.run_dir, "rcfd", "T4")
    rows = read_jsonl(log)
    assert {"loss", "cfd", "ent", "div", "reg", "pd", "lr", "grad_norm"} <= set(rows[0])
    assert loss_ratio(log) < LOSS_DROP


@pytest.mark.parametrize("method", ["pd", "rcfd"])
def test_a_student_that_does_not_move_fails_the_decrease_check(trained, tmp_path, method):
    """The rounds above with lr = 1e-12 (each Adam step moves a weight by about lr): the
    loss stays near its first value, so the decrease checks above can fail."""
    run, base, clf = trained
    run = dataclasses.replace(run, run_dir=tmp_path)
    if method == "pd":
        train_pd(distill_cfg(final_T=4, lr=1e-12), base, DATA, run)
    else:
        cfg = distill_cfg(RCFDStageConfig, start_T=8, final_T=4, steps_per_round=40, lr=1e-12)
        train_rcfd(cfg, base, clf, DATA, run)
    assert loss_ratio(metrics_path(tmp_path, method, "T4")) > LOSS_DROP


def test_rcfd_classifier_is_frozen_and_passes_gradients(trained, monkeypatch, tmp_path):
    run, base, clf = trained
    net = frozen(load_classifier(clf))
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    student_grads = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):  # the student's gradients, checked before the update
        student_grads.append(sum(float(p.grad.abs().sum()) for g in self.param_groups
                                 for p in g["params"] if p.grad is not None))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    cfg = distill_cfg(RCFDStageConfig, start_T=8, final_T=4, steps_per_round=3)
    train_rcfd(cfg, base, net, DATA, dataclasses.replace(run, run_dir=tmp_path))
    assert not net.training and not net.classifier.training
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    for k, v in net.state_dict().items():  # BatchNorm running stats untouched
        assert torch.equal(v, stats[k]), k
    assert len(student_grads) == 3 and all(g > 0 for g in student_grads)


def test_rcfd_checks_teacher_and_classifier(trained):
    run, base, clf = trained
    data = load_dataset(DATA, "train")
    cfg = distill_cfg(RCFDStageConfig, start_T=8, final_T=4)
    with pytest.raises(ValueError, match=r"T=4 \(rcfd.start_T\)"):
        train_rcfd(cfg.replace(start_T=4, final_T=2), base, clf, DATA, run)
    rgb = frozen(build(ClassifierConfig(name="resnet18", width=8, in_channels=3)))
    with pytest.raises(ValueError, match="3-channel images but the model makes 1-channel"):
        check_classifier_fits(rgb, data, cfg)
    with pytest.raises(ValueError, match="trained on 16x16 images"):
        check_classifier_fits(frozen(load_classifier(clf)), data, cfg, trained_size=16)
    five = frozen(build(ClassifierConfig(name="resnet18", width=8, in_channels=1, num_classes=5)))
    with pytest.raises(ValueError, match="predicts 5 classes but the digits data has 10"):
        check_classifier_fits(five, data, cfg)
    cfd_only = cfg.replace(loss=losses.RCFDLossConfig(alpha=0.0))
    check_classifier_fits(five, data, cfd_only)  # CFD alone does not need the data's classes


# --------------------------------------------------------------------------- loop contracts


def test_finished_stage_is_refused_unless_resume_or_overwrite(trained, monkeypatch):
    run, base, _ = trained
    with pytest.raises(StageExistsError, match="already holds a finished base stage.*--resume"):
        train_base(base_cfg(), DATA, run)
    stamp = base.stat().st_mtime_ns
    assert train_base(base_cfg(), DATA, dataclasses.replace(run, resume=True)) == base
    assert base.stat().st_mtime_ns == stamp  # skipped, not retrained
    with pytest.raises(ValueError, match="exclude each other"):
        RunContext(run.run_dir, resume=True, overwrite=True)


def test_overwrite_trains_again(tmp_path):
    run = RunContext(tmp_path, device="cpu", progress=False)
    cfg = base_cfg(steps=2)
    train_base(cfg, DATA, run)
    again = train_base(cfg, DATA, dataclasses.replace(run, overwrite=True))
    assert len(read_jsonl(metrics_path(tmp_path, "base", "model"))) == 2
    assert again.exists()


def _nan_at(step_to_break):
    calls = {"n": 0}
    real = losses.DenoisingLoss.__call__

    def objective(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out._replace(loss=out.loss * float("nan")) if calls["n"] == step_to_break else out
    return objective


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(losses.DenoisingLoss, "__call__", _nan_at(4))
    run = RunContext(tmp_path, device="cpu", progress=False)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 4.*loss.*nan.*"
                                                 r"last good checkpoint is .*model\.train\.pt"):
        train_base(base_cfg(steps=10, checkpoint_interval=2), DATA, run)
    state = torch.load(tmp_path / "base" / "model.train.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all()
                                      for v in state["model"].values())


def test_nonfinite_steps_can_be_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(losses.DenoisingLoss, "__call__", _nan_at(3))
    run = RunContext(tmp_path, device="cpu", progress=False, skip_nonfinite=1)
    path = train_base(base_cfg(steps=6), DATA, run)
    rows = read_jsonl(metrics_path(tmp_path, "base", "model"))
    assert [r["step"] for r in rows if r.get("skipped")] == [3]
    model, _ = load_diffusion_checkpoint(path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_loop_runs_a_plain_job(tmp_path):
    """The loop is generic: a linear regression job converges."""
    torch.manual_seed(0)
    w = torch.randn(4, 1)

    class Data:
        batch_size = 16

        def __next__(self):
            x = torch.randn(16, 4)
            return x, x @ w

        def state_dict(self):
            return {}

    def loss_fn(net, x, y, info):
        return torch.nn.functional.mse_loss(net(x), y), {}

    saved = {}
    job = Job(stage="toy", unit="lin", model=torch.nn.Linear(4, 1), loss_fn=loss_fn,
              batches=Data(), steps=200, optim=OptimSpec(lr=0.05), config={},
              finalize=lambda m, e, x, p: saved.setdefault("path", p))
    run_job(job, RunContext(tmp_path, device="cpu", progress=False))
    rows = read_jsonl(metrics_path(tmp_path, "toy", "lin"))
    assert rows[-1]["loss"] < 1e-3 * rows[0]["loss"] and saved["path"].name == "lin.safetensors"
    assert all(math.isfinite(r["grad_norm"]) for r in rows)


@pytest.mark.cuda
def test_gpu_options_end_to_end(tmp_path):
    """bf16 autocast, channels_last, fused Adam/SGD and the Triton KL on a GPU: every stage
    runs, stays finite, and resumes."""
    fast = TrainOptions(bf16=True, channels_last=True, fused=True, compile=False)
    run = RunContext(tmp_path, device="cuda", progress=False)
    clf = train_classifier(clf_cfg(options=fast, steps=20), DATA, run)
    with pytest.raises(SystemExit) as stopped:  # Interrupted, exit code 0
        train_base(base_cfg(options=fast, steps=40), DATA, dataclasses.replace(run, stop_after=20))
    assert getattr(stopped.value, "code", None) == 0
    base = train_base(base_cfg(options=fast, steps=40), DATA, dataclasses.replace(run, resume=True))
    cfg = distill_cfg(RCFDStageConfig, start_T=8, final_T=4, options=fast)
    train_rcfd(cfg, base, clf, DATA, run)
    for stage, unit in (("base", "model"), ("rcfd", "T4"), ("classifier", "distill")):
        rows = read_jsonl(metrics_path(tmp_path, stage, unit))
        assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    log = metrics_path(tmp_path, "base", "model")
    assert mean_loss(log, rows=slice(-10, None)) < mean_loss(log, rows=slice(0, 10))


def test_threads_default_to_the_cores_whatever_the_load():
    n = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        assert threads.configure_threads(1) == 1 == torch.get_num_threads()
        auto = threads.configure_threads(None)
        assert auto == min(cores, threads.MAX_DEFAULT_THREADS) == torch.get_num_threads()
        assert threads.configure_threads(None, processes=2) == max(1, auto // 2)
    finally:
        torch.set_num_threads(n)


def test_a_teacher_that_cannot_halve_is_refused():
    info = lambda T: DiffusionInfo(T=T, time_scale=1, prediction="x0", config=None, source="rcfd", weights="state_dict")  # noqa: E731
    assert check_halving(info(8), 2, "t.pt") == [(8, 4), (4, 2)]
    with pytest.raises(ValueError, match="t.pt is a T=12 sampler.*power of two"):
        check_halving(info(12), 1, "t.pt")
    with pytest.raises(ValueError, match="above 4"):
        check_halving(info(4), 4, "t.pt")
