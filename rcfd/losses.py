"""Training losses of METHOD.md: denoising ("both" / "x" / "eps"), the progressive
distillation target, and the RCFD terms (feature KL, entropy, diversity).

Every loss is a function of the networks and the batch, never a method of a sampler.
Networks are any callables ``model(z_t, t_index) -> x0_hat`` (or ``eps_hat`` with
``prediction="eps"``), ``t_index`` an int64 ``[B]`` tensor of schedule indices
``t * time_scale``. Schedule tables are the float64 CPU tensors of :mod:`rcfd.core.schedule`;
coefficients are gathered per sample as ``[B]`` tensors (fp32, or float64 for float64
images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Union

import torch
import torch.nn.functional as F

from rcfd import ops
from rcfd.core.schedule import Schedule

Coef = Union[float, torch.Tensor]
PREDICTIONS = ("x0", "eps")
LOSS_KINDS = ("both", "x", "eps")

# --------------------------------------------------------------------------- helpers


def check_choice(name: str, value: str, choices: tuple) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _bcast(c: Coef, x: torch.Tensor) -> Coef:
    """A scalar, or a ``[B]`` tensor viewed as ``[B, 1, ..., 1]`` against ``x``."""
    if isinstance(c, torch.Tensor) and c.dim() == 1:
        return c.reshape(-1, *([1] * (x.dim() - 1)))
    return c


def coef_dtype(x: torch.Tensor) -> torch.dtype:
    """Arithmetic dtype of the schedule coefficients for images ``x``: float64 for float64
    images, fp32 otherwise (also under bf16 autocast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def schedule_at(schedule: Schedule, index: torch.Tensor, like: torch.Tensor):
    """``(alpha[index], sigma[index])`` as ``[B]`` tensors on ``like``'s device (METHOD.md,
    "Cosine schedule"); ``index`` is an int64 ``[B]`` tensor of schedule indices."""
    if index.dtype != torch.int64:
        raise TypeError(f"schedule index must be an int64 tensor, got {index.dtype}")
    n = schedule.num_indices
    if index.device.type == "cpu" and index.numel() and (index.min() < 0 or index.max() >= n):
        raise ValueError(f"schedule index out of range 0..{n - 1}: {index.tolist()}")
    dtype = coef_dtype(like)
    alpha = schedule.alpha.to(device=like.device, dtype=dtype)
    sigma = schedule.sigma.to(device=like.device, dtype=dtype)
    index = index.to(like.device)
    return alpha[index], sigma[index]


def _check_sampler_fits(schedule: Schedule, T: int, time_scale: int) -> None:
    if T * time_scale >= schedule.num_indices:
        raise ValueError(
            f"a (T={T}, time_scale={time_scale}) sampler needs schedule indices up to "
            f"{T * time_scale} but the schedule has {schedule.num_indices} entries; build it "
            f"with cosine_schedule(T, time_scale) of the base model"
        )


def _draw(generator: torch.Generator | None, like: torch.Tensor, low: int, high: int):
    """``(t ~ U{low..high}, eps ~ N(0, I))`` drawn in that order from ``generator`` (on its
    device, then moved to ``like``'s), or from the global RNG on ``like``'s device."""
    device = generator.device if generator is not None else like.device
    t = torch.randint(low, high + 1, (like.shape[0],), generator=generator, device=device)
    eps = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return t.to(like.device), eps.to(like.device)


# --------------------------------------------------------------------------- predictions


def eps_from_x0(z_t: torch.Tensor, x0: torch.Tensor, alpha_t: Coef, sigma_t: Coef) -> torch.Tensor:
    """``eps_hat = (z_t - alpha_t * x0_hat) / sigma_t`` (METHOD.md, "The network predicts
    x0"); coefficients are scalars or ``[B]`` tensors."""
    return (z_t - _bcast(alpha_t, z_t) * x0) / _bcast(sigma_t, z_t)


def x0_from_eps(z_t: torch.Tensor, eps: torch.Tensor, alpha_t: Coef, sigma_t: Coef) -> torch.Tensor:
    """``x0_hat = (z_t - sigma_t * eps_hat) / alpha_t`` (METHOD.md, the eps-predicting
    variant); coefficients are scalars or ``[B]`` tensors."""
    return (z_t - _bcast(sigma_t, z_t) * eps) / _bcast(alpha_t, z_t)


def predict(model: Callable, z_t: torch.Tensor, t_index: torch.Tensor, alpha_t: Coef,
            sigma_t: Coef, prediction: str = "x0") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, eps_hat)`` from one network call ``model(z_t, t_index)``, whose output is
    ``x0_hat`` (``prediction="x0"``) or ``eps_hat`` (``"eps"``); the other one follows from
    ``z_t = alpha_t * x0 + sigma_t * eps``."""
    check_choice("prediction", prediction, PREDICTIONS)
    out = model(z_t, t_index)
    if out.shape != z_t.shape:
        raise ValueError(
            f"the model returned shape {tuple(out.shape)} for input {tuple(z_t.shape)}; "
            "it must predict an image of the input's shape"
        )
    if prediction == "x0":
        return out, eps_from_x0(z_t, out, alpha_t, sigma_t)
    return x0_from_eps(z_t, out, alpha_t, sigma_t), out


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


def base_loss(model: Callable, x0: torch.Tensor, schedule: Schedule, T: int, time_scale: int,
              kind: str = "both", prediction: str = "x0",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Base training loss (METHOD.md, "Base training"): ``t ~ U{0..T}``, ``eps ~ N(0, I)``
    (drawn in that order from ``generator`` when given), ``z_t = alpha_t x0 + sigma_t eps``
    at schedule index ``t * time_scale``, then :func:`denoising_loss` of ``kind``."""
    _check_sampler_fits(schedule, T, time_scale)
    t, eps = _draw(generator, x0, 0, T)
    index = t * time_scale
    alpha_t, sigma_t = schedule_at(schedule, index, x0)
    z_t = (_bcast(alpha_t, x0) * x0 + _bcast(sigma_t, x0) * eps).to(x0.dtype)
    x0_hat, eps_hat = predict(model, z_t, index, alpha_t, sigma_t, prediction)
    return denoising_loss(x0_hat, eps_hat, x0, eps, kind)


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
    x_target = (z_2 - _bcast(r, z_t) * z_t) / _bcast(a2 - r * a0, z_t)
    return x_target, eps_from_x0(z_t, x_target, a0, s0)


class PDOutput(NamedTuple):
    """What :func:`pd_loss` computed: the loss and the tensors a caller may reuse."""

    loss: torch.Tensor        # 0-dim, "both"-style loss vs the target (with grad)
    x0_hat: torch.Tensor      # student prediction, unclipped (with grad)
    eps_hat: torch.Tensor
    x_target: torch.Tensor    # teacher target (no grad)
    eps_target: torch.Tensor
    z_t: torch.Tensor
    t: torch.Tensor           # teacher steps [B]; the schedule index is t * teacher_ts


def pd_loss(student: Callable, teacher: Callable, x0: torch.Tensor, schedule: Schedule,
            teacher_T: int, teacher_ts: int, kind: str = "both", prediction: str = "x0",
            generator: torch.Generator | None = None) -> PDOutput:
    """Progressive-distillation loss (METHOD.md): ``t = 2 * U{1..T/2}`` teacher steps,
    ``eps ~ N(0, I)`` (drawn in that order), ``z_t = alpha_t x0 + sigma_t eps``; the student
    ``(T/2, 2 ts)`` predicts at the same schedule index ``t * ts``; :func:`denoising_loss`
    of ``kind`` against :func:`pd_target`."""
    if teacher_T < 2 or teacher_T % 2:
        raise ValueError(f"teacher_T must be even and >= 2 to halve it, got {teacher_T}")
    _check_sampler_fits(schedule, teacher_T, teacher_ts)
    half, eps = _draw(generator, x0, 1, teacher_T // 2)
    t = 2 * half
    index = t * teacher_ts
    alpha_t, sigma_t = schedule_at(schedule, index, x0)
    z_t = (_bcast(alpha_t, x0) * x0 + _bcast(sigma_t, x0) * eps).to(x0.dtype)
    x_target, eps_target = pd_target(teacher, z_t, t, schedule, teacher_ts, prediction)
    x0_hat, eps_hat = predict(student, z_t, index, alpha_t, sigma_t, prediction)
    loss = denoising_loss(x0_hat, eps_hat, x_target, eps_target, kind)
    return PDOutput(loss, x0_hat, eps_hat, x_target, eps_target, z_t, t)


# --------------------------------------------------------------------------- RCFD terms


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


@dataclass(frozen=True)
class RCFDLossConfig:
    """Weights and ablation switches of the RCFD loss
    ``L = L_CFD + alpha * (beta * L_ent + (1 - beta) * L_div)`` (METHOD.md).

    ``kl_on="logits"`` is the paper's "prediction KL" ablation; ``dual_temperature``
    divides the student by ``tau`` too (default: the teacher only)."""

    tau: float = 0.95
    alpha: float = 0.003
    beta: float = 0.75
    use_cfd: bool = True
    use_ent: bool = True
    use_div: bool = True
    kl_on: str = "features"
    dual_temperature: bool = False

    def __post_init__(self):
        if not self.tau > 0:
            raise ValueError(f"RCFDLossConfig.tau must be > 0, got {self.tau}")
        if not self.alpha >= 0:
            raise ValueError(f"RCFDLossConfig.alpha must be >= 0, got {self.alpha}")
        if not 0 <= self.beta <= 1:
            raise ValueError(f"RCFDLossConfig.beta must be in [0, 1], got {self.beta}")
        check_choice("RCFDLossConfig.kl_on", self.kl_on, ("features", "logits"))
        regularised = self.alpha > 0 and (self.use_ent or self.use_div)
        if not (self.use_cfd or regularised):
            raise ValueError("RCFDLossConfig switches off every term: enable use_cfd, or "
                             "use_ent/use_div with alpha > 0")


def check_frozen(classifier: Callable) -> None:
    """Raise unless a module classifier is in eval mode with no parameter needing grad."""
    if not isinstance(classifier, torch.nn.Module):
        return
    if classifier.training:
        raise ValueError("the classifier must be in eval mode: call classifier.eval()")
    if any(p.requires_grad for p in classifier.parameters()):
        raise ValueError("the classifier must be frozen (its parameters get no gradients): "
                         "call classifier.requires_grad_(False)")


def rcfd_loss(classifier: Callable, x0_hat: torch.Tensor, x_target: torch.Tensor,
              config: RCFDLossConfig = RCFDLossConfig()) -> tuple[torch.Tensor, dict]:
    """RCFD loss (METHOD.md, "Classifier-based feature distillation" and "Dataset-oriented
    losses"): ``L = L_CFD + alpha * (beta * L_ent + (1 - beta) * L_div)``.

    ``classifier(images) -> (logits, features)`` is frozen (:func:`check_frozen`); it sees
    ``x_target`` without grad and the UNCLIPPED student ``x0_hat`` with grad, so the
    gradient flows through it into the student. ``L_CFD = KL(softmax(f_T / tau) ||
    softmax(f_S / tau_S))`` over features (or logits), ``tau_S = tau`` with dual temperature
    and 1 otherwise. Returns ``(total, terms)``; ``terms`` holds every term as a detached
    0-dim tensor (``cfd``, ``ent``, ``div``, ``reg`` = the bracket, ``total``), including
    the ones switched off, which are computed for logging but left out of the total."""
    check_frozen(classifier)
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


def rcfd_distillation_loss(student: Callable, teacher: Callable, classifier: Callable,
                           x0: torch.Tensor, schedule: Schedule, teacher_T: int,
                           teacher_ts: int, config: RCFDLossConfig = RCFDLossConfig(),
                           prediction: str = "x0",
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """One RCFD distillation loss for a batch: the PD target of :func:`pd_loss`, then
    :func:`rcfd_loss` on ``(x0_hat, x_target)``. The PD "both" loss is logged as
    ``terms["pd"]`` but is not part of the total."""
    pd = pd_loss(student, teacher, x0, schedule, teacher_T, teacher_ts, "both", prediction,
                 generator)
    total, terms = rcfd_loss(classifier, pd.x0_hat, pd.x_target, config)
    terms["pd"] = pd.loss.detach()
    return total, terms
