"""One distillation training step (forward, backward, grad clip, Adam update), images/s:
our fastest settings against an eager fp32 step like the reference implementation's.

* ``pd``: a progressive-distillation step of the CIFAR-10 U-Net (teacher: two DDIM steps
  of an 8-step sampler of the 1024 lineage; student: one prediction).
* ``rcfd-resnet18`` / ``rcfd-densenet201``: the same step plus the RCFD loss through the
  frozen classifier (features of the teacher target and of the student's ``x0_hat``).

Modes, grouped per case so each table reads as a ratio against eager:

* ``eager-fp32``: fp32, contiguous tensors, Adam (foreach), the PyTorch DDIM update, and the
  feature KL as ``F.kl_div(log_softmax(f_S), softmax(f_T / tau), "batchmean")``;
* ``ours``: bf16 autocast, channels_last, fused Adam, the fused DDIM extension, the Triton
  KL (``rcfd.ops.feature_kl``), i.e. what the trainers run with the default options;
* ``ours-compile``: ``ours`` with ``torch.compile`` on the student (``slow``: compiling
  the U-Net takes minutes).

Batch 128 on a GPU. Without a GPU the digits U-Net (and a width-8 ResNet18) runs at batch
32, eager against ours (on the CPU "ours" only differs by the fused DDIM kernel).

    pytest benchmarks/bench_train_step.py --benchmark-only
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from rcfd.core.classifiers import ClassifierConfig, build, frozen
from rcfd.core.schedule import cosine_schedule
from rcfd.core.unet import UNet, UNetConfig
from rcfd.losses import PDLoss, RCFDLossConfig, diversity_loss, entropy_loss, rcfd_terms

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCH = 128 if CUDA else 32
TEACHER_T, TEACHER_TS = 8, 128  # an 8-step teacher of the 1024-step lineage
ROUNDS = 10 if CUDA else 2
WARMUP = 3 if CUDA else 1
LOSS = RCFDLossConfig(tau=0.95, alpha=0.003, beta=0.75)
CASES = ("pd", "rcfd-resnet18", "rcfd-densenet201") if CUDA else ("pd", "rcfd-resnet18")
MODES = ("eager-fp32", "ours", "ours-compile")

_eager_ips: dict = {}


@contextlib.contextmanager
def reference_ops():
    """The PyTorch references for every fused op (the baseline's DDIM update)."""
    old = os.environ.get("RCFD_BACKEND")
    os.environ["RCFD_BACKEND"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RCFD_BACKEND")
        else:
            os.environ["RCFD_BACKEND"] = old


def reference_rcfd_loss(classifier, x0_hat, x_target, c: RCFDLossConfig):
    """The reference implementation's loss: ``F.kl_div`` on log-softmaxes."""
    logits_s, f_s = classifier(x0_hat)
    with torch.no_grad():
        _, f_t = classifier(x_target)
    cfd = F.kl_div(F.log_softmax(f_s.float(), 1), F.softmax(f_t.float() / c.tau, 1),
                   reduction="batchmean")
    return cfd + c.alpha * (c.beta * entropy_loss(logits_s) + (1 - c.beta) * diversity_loss(logits_s))


def make_step(case: str, mode: str):
    """A closure running one full training step of ``case`` in ``mode``."""
    torch.manual_seed(0)
    ours = mode != "eager-fp32"
    if CUDA:
        cfg, clf_kw = UNetConfig.cifar10(dropout=0.0), {}
    else:
        cfg, clf_kw = UNetConfig.digits(dropout=0.0), {"width": 8}
    fmt = torch.channels_last if ours and CUDA else torch.contiguous_format
    student = UNet(cfg).to(DEVICE, memory_format=fmt)
    teacher = UNet(cfg).to(DEVICE, memory_format=fmt).eval().requires_grad_(False)
    classifier = None
    if case.startswith("rcfd"):
        arch = case.split("-", 1)[1]
        classifier = frozen(build(ClassifierConfig(name=arch, in_channels=cfg.in_channels, **clf_kw)))
        classifier = classifier.to(DEVICE, memory_format=fmt)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-5, fused=(ours and CUDA) or None)
    net = torch.compile(student) if mode == "ours-compile" else student
    schedule = cosine_schedule(TEACHER_T, TEACHER_TS)
    gen = torch.Generator(DEVICE).manual_seed(0)
    x0 = (torch.rand(BATCH, cfg.in_channels, cfg.image_size, cfg.image_size, device=DEVICE) * 2 - 1)
    x0 = x0.contiguous(memory_format=fmt)
    objective = PDLoss(teacher, schedule, TEACHER_T, TEACHER_TS)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if ours and CUDA else contextlib.nullcontext
    backend = contextlib.nullcontext if ours else reference_ops

    def step():
        with backend(), autocast():
            out = objective(net, x0, *objective.draw(gen, x0))
            if classifier is None:
                loss = out.loss
            elif ours:
                loss = rcfd_terms(classifier, out.x0_hat, out.x_target, LOSS)[0]
            else:
                loss = reference_rcfd_loss(classifier, out.x0_hat, out.x_target, LOSS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        if CUDA:
            torch.cuda.synchronize()

    return step


def cases():
    for case in CASES:
        for mode in MODES:
            marks = [pytest.mark.slow] if mode == "ours-compile" else []
            yield pytest.param(case, mode, id=f"{case}-{mode}", marks=marks)


@pytest.mark.parametrize("case, mode", list(cases()))
def test_train_step(benchmark, case, mode):
    if not CUDA and mode == "ours-compile":
        pytest.skip("torch.compile of the training step is a GPU case")
    step = make_step(case, mode)
    for _ in range(WARMUP):
        step()
    benchmark.group = f"train step {case} b={BATCH}"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=int(CUDA))
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, nothing timed
        return
    ips = BATCH / benchmark.stats.stats.median
    info = {"case": case, "mode": mode, "batch": BATCH, "device": str(DEVICE),
            "images_per_s": ips}
    if mode == "eager-fp32":
        _eager_ips[case] = ips
    elif case in _eager_ips:
        info["speedup_vs_eager"] = ips / _eager_ips[case]
    benchmark.extra_info.update(info)
