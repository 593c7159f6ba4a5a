"""Training losses of METHOD.md, one copy each, used by the trainers and the tests alike.

The objectives are small callable objects in the style of EDM's ``training/loss.py``: built
once from what does not change during training (the teacher, the schedule, the classifier,
the weights), then called as ``loss(student, x0, t, noise)`` with the time steps ``t`` and
the noise drawn explicitly (:meth:`DenoisingLoss.draw` etc. draw them from a generator; a
distributed trainer draws them for the global batch and passes each rank its rows).

* :class:`DenoisingLoss`: base training ("both" / "x" / "eps" losses);
* :class:`PDLoss`: progressive distillation against the two-step teacher target;
* :class:`RCFDLoss`: classifier-based feature distillation with the dataset-oriented terms.

The pure pieces they are made of are functions in the paper's notation: :func:`predict`,
:func:`denoising_loss`, :func:`pd_target`, :func:`entropy_loss`, :func:`diversity_loss`,
:func:`rcfd_terms`. Networks are any callables ``model(z_t, t_index) -> x0_hat`` (or
``eps_hat`` with ``prediction="eps"``), ``t_index`` an int64 ``[B]`` tensor of schedule
indices ``t * time_scale``.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple, Union

import torch
import torch.nn.functional as F
from pydantic import model_validator

from rcfd.core import ops
from rcfd.config import Fraction, NonNegFloat, PosFloat, Section
from rcfd.core.schedule import (
    PREDICTIONS,
    Schedule,
    check_sampler_fits,
    coef_dtype,
    diffuse,
    eps_from_x0,
    outputs_to_x0_eps,
    per_sample,
    schedule_at,
)

Coef = Union[float, torch.Tensor]
LOSS_KINDS = ("both", "x", "eps")


def check_choice(name: str, value: str, choices: tuple) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


class LossOutput(NamedTuple):
    """A loss (0-dim, with grad) and the terms to log (detached 0-dim tensors)."""

    loss: torch.Tensor
    terms: dict


# --------------------------------------------------------------------------- predictions


def predict(model: Callable, z_t: torch.Tensor, t_index: torch.Tensor, alpha_t: Coef,
            sigma_t: Coef, prediction: str = "x0") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, eps_hat)`` from one network call ``model(z_t, t_index)``, whose output is
    ``x0_hat`` (``prediction="x0"``), ``eps_hat`` (``"eps"``) or ``v_hat`` (``"v"``); the
    rest follows from ``z_t = alpha_t * x0 + sigma_t * eps``
    (:func:`~rcfd.core.schedule.outputs_to_x0_eps`)."""
    out = model(z_t, t_index)
    if out.shape != z_t.shape:
        raise ValueError(
            f"the model returned shape {tuple(out.shape)} for input {tuple(z_t.shape)}; "
            "it must predict an image of the input's shape"
        )
    return outputs_to_x0_eps(out, z_t, alpha_t, sigma_t, prediction)


def draw_noise(generator: torch.Generator | None, like: torch.Tensor, low: int, high: int,
               global_batch: int | None = None, rows: slice | None = None):
    """``(t ~ U{low..high}, eps ~ N(0, I))``, drawn in that order for ``global_batch``
    samples (default: ``like``'s batch) from ``generator`` on its device (or the global RNG
    on ``like``'s device), then this process's ``rows`` of them, on ``like``'s device. A
    distributed trainer draws the global batch on every rank and keeps its share, so N
    processes see the noise of one."""
    device = generator.device if generator is not None else like.device
    b = like.shape[0] if global_batch is None else global_batch
    t = torch.randint(low, high + 1, (b,), generator=generator, device=device)
    eps = torch.randn((b, *like.shape[1:]), generator=generator, device=device, dtype=like.dtype)
    if rows is not None:
        t, eps = t[rows], eps[rows]
    return t.to(like.device), eps.to(like.device)


# --------------------------------------------------------------------------- denoising


def denoising_loss(x0_hat: torch.Tensor, eps_hat: torch.Tensor, x0: torch.Tensor,
                   eps: torch.Tensor, kind: str = "both", reduction: str = "mean") -> torch.Tensor:
    """Denoising loss (METHOD.md, "Base training"), per sample over all non-batch dims:
    ``"x"``: ``mean((x0_hat - x0)^2)``; ``"eps"``: ``mean((eps_hat - eps)^2)``; ``"both"``
    (truncated SNR weighting): the max of the two. ``reduction="mean"`` averages over the
    batch, ``"none"`` returns the ``[B]`` per-sample losses. Computed in fp32 at least."""
    check_choice("kind", kind, LOSS_KINDS)
    check_choice("reduction", reduction, ("mean", "none"))

    def per_sample_mse(a, b):
        d = a.to(coef_dtype(a)) - b.to(coef_dtype(a))
        return d.square().flatten(1).mean(1)

    if kind == "x":
        per = per_sample_mse(x0_hat, x0)
    elif kind == "eps":
        per = per_sample_mse(eps_hat, eps)
    else:
        per = torch.maximum(per_sample_mse(x0_hat, x0), per_sample_mse(eps_hat, eps))
    return per.mean() if reduction == "mean" else per


class DenoisingLoss:
    """Base training loss (METHOD.md, "Base training") of a ``(T, time_scale)`` model:
    ``z_t = alpha_t x0 + sigma_t eps`` at schedule index ``t * time_scale``, then
    :func:`denoising_loss` of ``kind`` between the model's ``(x0_hat, eps_hat)`` and
    ``(x0, eps)``. :meth:`draw` gives ``t ~ U{0..T}`` and ``eps ~ N(0, I)``."""

    def __init__(self, schedule: Schedule, T: int, time_scale: int = 1, kind: str = "both",
                 prediction: str = "x0"):
        check_choice("kind", kind, LOSS_KINDS)
        check_choice("prediction", prediction, PREDICTIONS)
        check_sampler_fits(schedule, T, time_scale)
        self.schedule, self.T, self.time_scale = schedule, T, time_scale
        self.kind, self.prediction = kind, prediction

    def draw(self, generator, x0, global_batch=None, rows=None):
        return draw_noise(generator, x0, 0, self.T, global_batch, rows)

    def __call__(self, model: Callable, x0: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> LossOutput:
        index = t * self.time_scale
        z_t, alpha_t, sigma_t = diffuse(x0, noise, index, self.schedule)
        x0_hat, eps_hat = predict(model, z_t, index, alpha_t, sigma_t, self.prediction)
        return LossOutput(denoising_loss(x0_hat, eps_hat, x0, noise, self.kind), {})


# --------------------------------------------------------------------------- distillation


@torch.no_grad()
def pd_target(teacher: Callable, z_t: torch.Tensor, t: torch.Tensor, schedule: Schedule,
              time_scale: int, prediction: str = "x0") -> tuple[torch.Tensor, torch.Tensor]:
    """Progressive-distillation target (METHOD.md, "Progressive distillation target").

    ``t`` is an int64 ``[B]`` tensor of TEACHER steps (each ``>= 2``), schedule index
    ``t * time_scale``. Two unclipped teacher DDIM steps ``z_t -> z_{t-1} -> z_{t-2}``, then
    with ``r = sigma_{t-2} / sigma_t``::

        x_target   = (z_{t-2} - r z_t) / (alpha_{t-2} - r alpha_t)
        eps_target = (z_t - alpha_t x_target) / sigma_t

    so one student DDIM step ``t -> t-2`` predicting ``x_target`` lands on ``z_{t-2}``.
    """
    if t.dim() != 1 or t.shape[0] != z_t.shape[0]:
        raise ValueError(f"t must be a [B] tensor of teacher steps with B={z_t.shape[0]}, "
                         f"got shape {tuple(t.shape)}")
    i0, i1, i2 = (t * time_scale, (t - 1) * time_scale, (t - 2) * time_scale)
    a0, s0 = schedule_at(schedule, i0, z_t)
    a1, s1 = schedule_at(schedule, i1, z_t)
    a2, s2 = schedule_at(schedule, i2, z_t)
    x_hat, _ = predict(teacher, z_t, i0, a0, s0, prediction)
    z_1 = ops.ddim_update(z_t, x_hat.to(z_t.dtype), a1, s1, a0, s0, clip=False)
    x_hat, _ = predict(teacher, z_1, i1, a1, s1, prediction)
    z_2 = ops.ddim_update(z_1, x_hat.to(z_t.dtype), a2, s2, a1, s1, clip=False)
    r = s2 / s0
    x_target = (z_2 - per_sample(r, z_t) * z_t) / per_sample(a2 - r * a0, z_t)
    return x_target, eps_from_x0(z_t, x_target, a0, s0)


class PDOutput(NamedTuple):
    """What :class:`PDLoss` computed: the loss and the tensors a caller may reuse."""

    loss: torch.Tensor        # 0-dim, the denoising loss vs the target (with grad)
    x0_hat: torch.Tensor      # student prediction, unclipped (with grad)
    eps_hat: torch.Tensor
    x_target: torch.Tensor    # teacher target (no grad)
    eps_target: torch.Tensor
    z_t: torch.Tensor
    t: torch.Tensor           # teacher steps [B]; the schedule index is t * teacher_time_scale

    @property
    def terms(self) -> dict:
        return {}


class PDTarget(NamedTuple):
    """What :meth:`PDLoss.target` computes of a batch before any student is called."""

    z_t: torch.Tensor
    t: torch.Tensor           # teacher steps [B]
    index: torch.Tensor       # their schedule indices t * teacher_time_scale
    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    x_target: torch.Tensor    # teacher target (no grad)
    eps_target: torch.Tensor


class PDLoss:
    """Progressive-distillation loss (METHOD.md) for a teacher ``(T, time_scale)`` and its
    student ``(T/2, 2 time_scale)``: ``z_t = alpha_t x0 + sigma_t eps`` at the teacher step
    ``t`` (schedule index ``t * time_scale``, where the student predicts too), the
    :func:`pd_target` of two unclipped teacher DDIM steps, and :func:`denoising_loss` of
    ``kind`` between the student and the target. :meth:`draw` gives ``t = 2 * U{1..T/2}``
    and ``eps ~ N(0, I)``. ``prediction`` is the teacher's output, ``student_prediction``
    the student's (``None``: the teacher's); the target is the same either way, in x0 and
    eps, so the parameterisation only changes how the student's output is read."""

    def __init__(self, teacher: Callable, schedule: Schedule, teacher_T: int,
                 teacher_time_scale: int, kind: str = "both", prediction: str = "x0",
                 student_prediction: str | None = None):
        if teacher_T < 2 or teacher_T % 2:
            raise ValueError(f"teacher_T must be even and >= 2 to halve it, got {teacher_T}")
        student_prediction = prediction if student_prediction is None else student_prediction
        check_choice("kind", kind, LOSS_KINDS)
        check_choice("prediction", prediction, PREDICTIONS)
        check_choice("student_prediction", student_prediction, PREDICTIONS)
        check_sampler_fits(schedule, teacher_T, teacher_time_scale)
        self.teacher, self.schedule = teacher, schedule
        self.T, self.time_scale, self.kind, self.prediction = (teacher_T, teacher_time_scale,
                                                               kind, prediction)
        self.student_prediction = student_prediction

    def draw(self, generator, x0, global_batch=None, rows=None):
        half, eps = draw_noise(generator, x0, 1, self.T // 2, global_batch, rows)
        return 2 * half, eps

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> PDTarget:
        """The teacher's side of a batch: ``z_t`` and its :func:`pd_target` (no grad)."""
        index = t * self.time_scale
        z_t, alpha_t, sigma_t = diffuse(x0, noise, index, self.schedule)
        x_target, eps_target = pd_target(self.teacher, z_t, t, self.schedule, self.time_scale,
                                         self.prediction)
        return PDTarget(z_t, t, index, alpha_t, sigma_t, x_target, eps_target)

    def score(self, student: Callable, target: PDTarget) -> PDOutput:
        """The student's side: its prediction at ``target.z_t`` and the loss against it (so
        one target can score several students, as :func:`__call__` does one)."""
        x0_hat, eps_hat = predict(student, target.z_t, target.index, target.alpha_t, target.sigma_t,
                                  self.student_prediction)
        loss = denoising_loss(x0_hat, eps_hat, target.x_target, target.eps_target, self.kind)
        return PDOutput(loss, x0_hat, eps_hat, target.x_target, target.eps_target, target.z_t, target.t)

    def __call__(self, student: Callable, x0: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> PDOutput:
        return self.score(student, self.target(x0, t, noise))


# --------------------------------------------------------------------------- RCFD


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """``L_ent = mean_b(-sum_k p[b,k] log p[b,k])``, ``p = softmax(logits)`` (METHOD.md,
    "Dataset-oriented losses"); from ``log_softmax`` so an underflowed ``p`` is never
    logged. Computed in fp32 at least."""
    logp = F.log_softmax(logits.to(coef_dtype(logits)), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def diversity_loss(logits: torch.Tensor) -> torch.Tensor:
    """``L_div = sum_k pbar_k log pbar_k``, ``pbar = mean_b softmax(logits)`` (METHOD.md,
    "Dataset-oriented losses"), with ``log pbar = logsumexp_b(log_softmax) - log B`` so no
    probability is logged after underflowing. Computed in fp32 at least."""
    logp = F.log_softmax(logits.to(coef_dtype(logits)), dim=-1)
    log_pbar = torch.logsumexp(logp, dim=0) - math.log(logits.shape[0])
    return (log_pbar.exp() * log_pbar).sum()


class RCFDLossConfig(Section):
    """Weights and ablation switches of the RCFD loss
    ``L = L_CFD + alpha * (beta * L_ent + (1 - beta) * L_div)`` (METHOD.md).

    ``kl_on="logits"`` is the paper's "prediction KL" ablation; ``dual_temperature``
    divides the student by ``tau`` too (default: the teacher only); ``alpha = 0`` is CFD
    alone."""

    tau: PosFloat = 0.95
    alpha: NonNegFloat = 0.003
    beta: Fraction = 0.75
    use_cfd: bool = True
    use_ent: bool = True
    use_div: bool = True
    kl_on: Literal["features", "logits"] = "features"
    dual_temperature: bool = False

    @model_validator(mode="after")
    def _some_term(self) -> "RCFDLossConfig":
        regularised = self.alpha > 0 and (self.use_ent or self.use_div)
        if not (self.use_cfd or regularised):
            raise ValueError("the switches turn off every term: enable use_cfd, or "
                             "use_ent/use_div with alpha > 0")
        return self


def check_frozen(classifier: Callable) -> None:
    """Raise unless a module classifier is in eval mode with no parameter needing grad."""
    if not isinstance(classifier, torch.nn.Module):
        return
    if classifier.training:
        raise ValueError("the classifier must be in eval mode: call classifier.eval()")
    if any(p.requires_grad for p in classifier.parameters()):
        raise ValueError("the classifier must be frozen (its parameters get no gradients): "
                         "call classifier.requires_grad_(False)")


def rcfd_terms(classifier: Callable, x0_hat: torch.Tensor, x_target: torch.Tensor,
              config: RCFDLossConfig = RCFDLossConfig()) -> tuple[torch.Tensor, dict]:
    """RCFD loss (METHOD.md, "Classifier-based feature distillation" and "Dataset-oriented
    losses"): ``L = L_CFD + alpha * (beta * L_ent + (1 - beta) * L_div)``.

    ``classifier(images) -> (logits, features)`` must be frozen (:func:`check_frozen`; the
    caller checks, once); it sees
    ``x_target`` without grad and the UNCLIPPED student ``x0_hat`` with grad, so the
    gradient flows through it into the student. ``L_CFD = KL(softmax(f_T / tau) ||
    softmax(f_S / tau_S))`` over features (or logits), ``tau_S = tau`` with dual temperature
    and 1 otherwise. Returns ``(total, terms)``; ``terms`` holds every term as a detached
    0-dim tensor (``cfd``, ``ent``, ``div``, ``reg`` = the bracket, ``total``), including
    the ones switched off, which are computed for logging but left out of the total."""
    logits_s, feats_s = classifier(x0_hat)
    with torch.no_grad():
        logits_t, feats_t = classifier(x_target.detach())
    on_features = config.kl_on == "features"
    student, teacher = (feats_s, feats_t) if on_features else (logits_s, logits_t)
    tau_s = config.tau if config.dual_temperature else 1.0
    if config.use_cfd:
        cfd = ops.feature_kl(student, teacher, tau_teacher=config.tau, tau_student=tau_s)
    else:
        with torch.no_grad():
            cfd = ops.feature_kl(student.detach(), teacher, config.tau, tau_s)
    ent = entropy_loss(logits_s)
    div = diversity_loss(logits_s)
    zero = logits_s.new_zeros((), dtype=ent.dtype)
    reg = config.beta * (ent if config.use_ent else zero) + (1 - config.beta) * (
        div if config.use_div else zero)
    total = (cfd if config.use_cfd else zero) + config.alpha * reg
    terms = {"cfd": cfd, "ent": ent, "div": div, "reg": reg, "total": total}
    return total, {k: v.detach() for k, v in terms.items()}


class RCFDLoss:
    """RCFD loss (METHOD.md) of one batch: the :class:`PDLoss` target and student
    prediction, then :func:`rcfd_terms` on the unclipped ``x0_hat`` and ``x_target``. The
    PD loss is logged as ``terms["pd"]`` but is not part of the total."""

    def __init__(self, pd: PDLoss, classifier: Callable, config: RCFDLossConfig = RCFDLossConfig()):
        check_frozen(classifier)
        self.pd, self.classifier, self.config = pd, classifier, config

    def draw(self, generator, x0, global_batch=None, rows=None):
        return self.pd.draw(generator, x0, global_batch, rows)

    def __call__(self, student: Callable, x0: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> LossOutput:
        return self.score(student, self.pd.target(x0, t, noise))

    def score(self, student: Callable, target: PDTarget) -> LossOutput:
        """The loss of ``student`` against a :meth:`PDLoss.target` (:meth:`PDLoss.score`)."""
        pd = self.pd.score(student, target)
        total, terms = rcfd_terms(self.classifier, pd.x0_hat, pd.x_target, self.config)
        terms.pop("total")
        terms["pd"] = pd.loss.detach()
        return LossOutput(total, terms)
