"""One distillation training step (forward, backward, grad clip, Adam update) in three modes,
with its MFU, and the issue's targets printed as met / not met.

Cases: ``pd`` (a progressive-distillation step of the CIFAR-10 U-Net: the teacher's two DDIM
steps of an 8-step sampler of the 1024 lineage, the student's prediction), and
``rcfd-resnet18`` / ``rcfd-densenet201`` (the same plus the RCFD loss through the frozen
classifier: features of the teacher target and of the student's ``x0_hat``).

Modes, in one run so every table reads as a ratio against eager:

* ``eager-fp32``: the reference-equivalent step: fp32, contiguous tensors, PyTorch defaults
  (no cudnn.benchmark), Adam (foreach), the PyTorch DDIM update, the feature KL as
  ``F.kl_div(log_softmax(f_S), softmax(f_T / tau), "batchmean")``;
* ``compile``: that same step with its loss (teacher, student, classifier) compiled by
  ``torch.compile`` in the default mode;
* ``ours``: what the trainers run by default (:mod:`rcfd.training.fast_step`): the whole
  objective compiled, bf16 autocast, channels_last, cudnn.benchmark, fused Adam, our fused
  DDIM update and Triton KL.

Every step ends in one host synchronisation before the Adam update, as the training loop's.
On a GPU the step time is GPU time (CUDA events around each step), batch 128; the first call
of a compiled mode is its compile time (``compile_s``, outside the timed rounds). MFU is the
step's FLOPs (``torch.utils.flop_counter``: every network, forward and backward) per second
over the card's dense bf16 peak (:mod:`flops`). Without a GPU: the digits U-Net (and a
width-8 ResNet18) at batch 32, host time; ``compile`` is skipped there (Inductor needs
minutes on a small CPU; ``RCFD_BENCH_CPU_COMPILE=1`` runs it) and ``ours`` is eager, as the
trainers are on the CPU.

    pytest benchmarks/bench_train_step.py --benchmark-only
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch
import torch.nn.functional as F
from flops import count_flops, describe_mfu, mfu, peak_flops

from rcfd.core import ops
from rcfd.core.classifiers import ClassifierConfig, build, frozen
from rcfd.core.precision import autocast, training_dtype
from rcfd.core.schedule import cosine_schedule
from rcfd.core.unet import UNet, UNetConfig
from rcfd.losses import LossOutput, PDLoss, RCFDLoss, RCFDLossConfig, diversity_loss, entropy_loss
from rcfd.training import fast_step
from rcfd.training.loop import StepInfo
from rcfd.training.optim import OptimSpec, grad_norm, make_optimizer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCH = 128 if CUDA else 32
TEACHER_T, TEACHER_TS = 8, 128  # an 8-step teacher of the 1024-step lineage
ROUNDS = 10 if CUDA else 2
WARMUP = 3 if CUDA else 1
LOSS = RCFDLossConfig(tau=0.95, alpha=0.003, beta=0.75)
CASES = ("pd", "rcfd-resnet18", "rcfd-densenet201") if CUDA else ("pd", "rcfd-resnet18")
MODES = ("eager-fp32", "ours", "compile")  # eager first: the others are ratios against it
CPU_COMPILE = os.environ.get("RCFD_BENCH_CPU_COMPILE") == "1"
# The targets at batch 128 on one H100 / H200: (case, speed-up over eager, MFU).
TARGETS = (("pd", 2.5, 0.20), ("rcfd-resnet18", 2.5, 0.20), ("rcfd-densenet201", 2.5, None))

_results: dict = {}  # (case, mode) -> extra_info
_flops: dict = {}  # case -> FLOPs per step


class ReferenceRCFDLoss:
    """The reference implementation's RCFD loss (``F.kl_div`` on log-softmaxes) as a loss
    object of the same contract as :class:`rcfd.losses.RCFDLoss`."""

    def __init__(self, pd: PDLoss, classifier, config: RCFDLossConfig):
        self.pd, self.classifier, self.c = pd, classifier, config

    def draw(self, generator, x0, global_batch=None, rows=None):
        return self.pd.draw(generator, x0, global_batch, rows)

    def __call__(self, student, x0, t, noise) -> LossOutput:
        out, c = self.pd(student, x0, t, noise), self.c
        logits_s, f_s = self.classifier(out.x0_hat)
        with torch.no_grad():
            _, f_t = self.classifier(out.x_target)
        cfd = F.kl_div(F.log_softmax(f_s.float(), 1), F.softmax(f_t.float() / c.tau, 1),
                       reduction="batchmean")
        reg = c.beta * entropy_loss(logits_s) + (1 - c.beta) * diversity_loss(logits_s)
        return LossOutput(cfd + c.alpha * reg, {})


def backend_settings(mode: str):
    """cuDNN as each mode runs it: PyTorch's defaults for the reference-equivalent modes,
    the trainers' command line's (cudnn.benchmark) for ours."""
    if not CUDA:
        return contextlib.nullcontext()
    return torch.backends.cudnn.flags(enabled=True, benchmark=mode == "ours",
                                      deterministic=False, allow_tf32=True)


def make_step(case: str, mode: str):
    """``(step, loss_call)``: a closure running one full training step of ``case`` in
    ``mode``, and one running its loss and backward alone (for the FLOP count)."""
    torch.manual_seed(0)
    ours = mode == "ours"
    if CUDA:
        cfg, clf_kw = UNetConfig.cifar10(dropout=0.0), {}
    else:
        cfg, clf_kw = UNetConfig.digits(dropout=0.0), {"width": 8}
    fmt = torch.channels_last if ours and CUDA else torch.contiguous_format
    student = UNet(cfg).to(DEVICE, memory_format=fmt)
    teacher = UNet(cfg).to(DEVICE, memory_format=fmt).eval().requires_grad_(False)
    objective = PDLoss(teacher, cosine_schedule(TEACHER_T, TEACHER_TS), TEACHER_T, TEACHER_TS)
    if case.startswith("rcfd"):
        arch = case.split("-", 1)[1]
        classifier = build(ClassifierConfig(name=arch, in_channels=cfg.in_channels, **clf_kw))
        classifier = frozen(classifier).to(DEVICE, memory_format=fmt)
        objective = (RCFDLoss if ours else ReferenceRCFDLoss)(objective, classifier, LOSS)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = make_optimizer(params, OptimSpec("adam", 5e-5), fused=ours and CUDA)
    loss_fn = fast_step.ObjectiveStep(objective)
    if mode == "compile" or (ours and CUDA):
        loss_fn = loss_fn.compiled(region=f"{case} {mode}")  # each compiled case apart
    x0 = torch.rand(BATCH, cfg.in_channels, cfg.image_size, cfg.image_size, device=DEVICE) * 2 - 1
    x0 = x0.contiguous(memory_format=fmt)
    info = StepInfo(0, torch.Generator(DEVICE).manual_seed(0), 0, 1, BATCH)
    routes = contextlib.nullcontext if ours else ops.references  # the baseline: every op on its reference

    def loss_call():
        with backend_settings(mode):
            with routes(), autocast(DEVICE, training_dtype(ours, DEVICE)):
                loss, _ = loss_fn(student, x0, None, info)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        return loss.detach()

    def step():
        loss = loss_call()
        norm = grad_norm(params, 1.0)
        if not torch.isfinite(loss + norm):  # the loop's one host sync per step
            raise FloatingPointError(f"{case} {mode}: non-finite loss or gradient")
        opt.step()

    return step, loss_call


def cases():
    for mode in MODES:
        for case in CASES:
            yield pytest.param(case, mode, id=f"{case}-{mode}")


@pytest.fixture(scope="module")
def say(request):
    """Write a line to the terminal as soon as it is known (pytest's capture aside), and
    every target's verdict at the end of the module."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")

    def write(line: str) -> None:
        if reporter is None or capture is None:
            print(line)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
    yield write
    for line in verdicts():
        write(line)


def verdicts() -> list[str]:
    """Every target of the issue with "met", "not met" or why it was not measured."""
    card = torch.cuda.get_device_name() if CUDA else "no GPU"
    lines = [f"train step targets (batch 128 on an H100 / H200; this run: {card}, b={BATCH}):"]
    for case, speedup, mfu_min in TARGETS:
        got = _results.get((case, "ours"), {})
        compiled = _results.get((case, "compile"))
        if got and compiled:
            ratio = compiled["step_ms"] / got["step_ms"]
            lines.append(f"  {case} ours vs torch.compile of the eager step: {ratio:.2f}x")
        for what, want, have in (("speed-up over eager fp32", speedup, got.get("speedup_vs_eager")),
                                 ("MFU", mfu_min, got.get("mfu"))):
            if want is None:
                continue
            goal = f"{case} {what} >= {want:g}" if what != "MFU" else f"{case} MFU >= {want:.0%}"
            if not (CUDA and BATCH == 128):
                verdict = "not measured (no GPU: the targets are GPU targets)"
            elif have is None:
                verdict = "not measured" + (" (peak unknown)" if what == "MFU" and got else "")
            else:
                shown = f"{have:.2f}x" if what != "MFU" else f"{100 * have:.1f}%"
                verdict = f"{'met' if have >= want else 'not met'} ({shown})"
            lines.append(f"  {goal}: {verdict}")
    return lines


def step_seconds(benchmark, events: list, host: list) -> tuple[float, str]:
    """The median step time: GPU time from CUDA events on a GPU, else the host's."""
    if events:
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) / 1e3 for s, e in events)
        return times[len(times) // 2], "cuda-events"
    if benchmark.stats is not None:
        return benchmark.stats.stats.median, "host"
    return sorted(host)[len(host) // 2], "host"


@pytest.mark.parametrize("case, mode", list(cases()))
def test_train_step(benchmark, say, case, mode):
    if mode == "compile" and not CUDA and not CPU_COMPILE:
        pytest.skip("compiling the step takes minutes on a CPU; RCFD_BENCH_CPU_COMPILE=1 runs it")
    step, loss_call = make_step(case, mode)
    if case not in _flops:  # once per case, on its eager step: every mode does the same FLOPs
        counted = loss_call if mode == "eager-fp32" else make_step(case, "eager-fp32")[1]
        _flops[case] = count_flops(counted)
    t0 = time.perf_counter()
    step()
    if CUDA:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(WARMUP - 1):
        step()
    events, host = [], []

    def timed():
        t = time.perf_counter()
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events.append((start, end))
        else:
            step()
        host.append(time.perf_counter() - t)

    benchmark.group = f"train step {case} b={BATCH}"
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    seconds, timing = step_seconds(benchmark, events, host)
    flops, peak = _flops[case], peak_flops()
    info = {"case": case, "mode": mode, "batch": BATCH, "device": str(DEVICE), "timing": timing,
            "step_ms": 1e3 * seconds, "images_per_s": BATCH / seconds,
            "tflop_per_step": flops / 1e12, "tflops": flops / seconds / 1e12,
            "mfu": mfu(flops, seconds, peak), "peak_tflops": None if peak is None else peak / 1e12}
    if mode != "eager-fp32" and (CUDA or mode == "compile"):
        info["compile_s"] = first_s  # the first step: compiling, plus one step
    eager = _results.get((case, "eager-fp32"))
    if eager is not None and mode != "eager-fp32":
        info["speedup_vs_eager"] = eager["step_ms"] / info["step_ms"]
    _results[(case, mode)] = info
    benchmark.extra_info.update(info)
    ratio = f", {info['speedup_vs_eager']:.2f}x eager" if "speedup_vs_eager" in info else ""
    compiled = f", compiled in {info['compile_s']:.0f} s" if "compile_s" in info else ""
    say(f"train step {case} {mode} b={BATCH}: {info['step_ms']:.1f} ms ({timing}), "
        f"{info['images_per_s']:.0f} img/s, {info['tflops']:.3g} TFLOP/s, MFU "
        f"{describe_mfu(info['mfu'])}{ratio}{compiled}")
