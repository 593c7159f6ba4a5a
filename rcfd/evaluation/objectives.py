"""Objective diagnostics: what each distilled student scores on the objectives it and its
rivals were trained on, on ONE fixed held-out set of draws, next to its teacher's.

For a student ``(T/2, 2 time_scale)`` distilled from a teacher ``(T, time_scale)`` (a PD,
RCFD or CFD round), :func:`objective_losses` evaluates :class:`rcfd.losses.RCFDLoss` (which
holds the :class:`rcfd.losses.PDLoss`, ``kind="both"``, and the CFD feature KL with the
run's distillation classifier and its ``tau`` / ``kl_on`` / ``dual_temperature``) on the
draws, twice: with the student, and with the teacher in the student's place (the student
at initialisation, since every round starts from its teacher's weights). It reports the
PD loss ``pd`` and the CFD loss ``cfd`` of each; lower is better for both, and a student
below its teacher lowered that objective.

The draws (:func:`held_out_draws`) are fixed by the run's seed: ``x0`` a seeded subset of
``num`` images of the held-out split (the study's ``eval.diagnostics``, default
:data:`DIAGNOSTIC_SAMPLES`; all of the split when it is smaller), and per
image a uniform ``u`` and the noise ``eps ~ N(0, I)``, all drawn on the CPU. A round with
teacher ``T`` uses the teacher steps ``t = 2 (1 + floor(u T / 2))``, which is distributed
as the training draw ``t = 2 U{1..T/2}`` (:meth:`rcfd.losses.PDLoss.draw`) and is the same
``t`` for every student of one teacher. Every row records :attr:`Draws.fingerprint` of the
tensors it was computed on, so a report can check that all rows share them.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch

from rcfd.core.schedule import schedule_of
from rcfd.core.seeds import derive_seed
from rcfd.data import ImageDataset
from rcfd.losses import PDLoss, PDTarget, RCFDLoss, RCFDLossConfig

DIAGNOSTIC_SAMPLES = 512
DRAWS_STREAM = "rcfd-diagnostics"
REPORTED = ("pd", "cfd")  # the terms a row reports, for the student and for its teacher


@dataclass(frozen=True)
class Draws:
    """The fixed held-out draws: ``x0`` float ``[N, C, H, W]`` in ``[-1, 1]``, ``u`` float64
    ``[N]`` in ``[0, 1)`` (the time step of each image, :meth:`t`), ``noise`` ``[N, C, H, W]``."""

    x0: torch.Tensor
    u: torch.Tensor
    noise: torch.Tensor

    def t(self, teacher_T: int) -> torch.Tensor:
        """The teacher steps of a round with teacher ``teacher_T``: ``2 (1 + floor(u T/2))``,
        int64 ``[N]`` in ``{2, 4, ..., T}`` (module docstring)."""
        half = (self.u * (teacher_T // 2)).floor().long().clamp_(0, teacher_T // 2 - 1)
        return 2 * (1 + half)

    @property
    def fingerprint(self) -> str:
        """The first 16 hex digits of the sha256 of ``x0``, ``u`` and ``noise``'s bytes."""
        h = hashlib.sha256()
        for x in (self.x0, self.u, self.noise):
            h.update(x.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def to(self, device) -> Draws:
        return Draws(self.x0.to(device), self.u.to(device), self.noise.to(device))


def held_out_draws(images: ImageDataset, seed: int, num: int = DIAGNOSTIC_SAMPLES) -> Draws:
    """The draws of a run (module docstring): ``min(num, len(images))`` images chosen by a
    seeded permutation, then ``u`` and the noise, all from one CPU generator seeded with
    ``derive_seed("rcfd-diagnostics", seed)``; the same for a seed on every machine."""
    if num < 1 or len(images) < 1:
        raise ValueError(f"need at least one image and num >= 1, got {len(images)} images, num={num}")
    g = torch.Generator().manual_seed(derive_seed(DRAWS_STREAM, seed))
    pick = torch.randperm(len(images), generator=g)[:num]
    x0 = images.to_float()[pick]
    u = torch.rand(len(pick), generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g)
    return Draws(x0, u, noise)


@dataclass(frozen=True)
class TeacherSide:
    """What every student of one teacher shares: the objective, the teacher's PD target on
    the draws (on the teacher's device) and the teacher's own losses in a student's place."""

    objective: RCFDLoss
    target: PDTarget
    losses: dict
    draws: str


def _losses(objective: RCFDLoss, model, target: PDTarget, prediction: str | None = None) -> dict:
    """The reported terms of ``model`` scored against ``target``, its output read as
    ``prediction`` (default: the teacher's)."""
    if prediction is not None and prediction != objective.pd.student_prediction:
        pd = copy.copy(objective.pd)
        pd.student_prediction = prediction
        objective = RCFDLoss(pd, objective.classifier, objective.config)
    terms = objective.score(model, target).terms
    return {k: float(terms[k]) for k in REPORTED}


@torch.no_grad()
def teacher_side(teacher: torch.nn.Module, teacher_info, classifier, loss: RCFDLossConfig,
                 draws: Draws) -> TeacherSide:
    """The teacher's share of :func:`objective_losses` (two teacher calls for the target,
    one in the student's place), to reuse for each of its students."""
    T, ts = teacher_info.T, teacher_info.time_scale
    pd = PDLoss(teacher, schedule_of(teacher_info), T, ts, "both", teacher_info.prediction)
    objective = RCFDLoss(pd, classifier, loss)
    on = draws.to(next(teacher.parameters()).device)
    target = pd.target(on.x0, on.t(T), on.noise)
    return TeacherSide(objective, target, _losses(objective, teacher, target), draws.fingerprint)


@torch.no_grad()
def student_losses(side: TeacherSide, student: torch.nn.Module, prediction: str | None = None) -> dict:
    """A row of the diagnostics: ``{"draws": fingerprint, "student": {"pd", "cfd"},
    "teacher": {"pd", "cfd"}}``; ``prediction`` is the student's (default: its teacher's;
    a v student of an eps teacher says ``"v"``)."""
    return {"draws": side.draws, "student": _losses(side.objective, student, side.target, prediction),
            "teacher": dict(side.losses)}


def objective_losses(student: torch.nn.Module, teacher: torch.nn.Module, teacher_info,
                     classifier, loss: RCFDLossConfig, draws: Draws) -> dict:
    """The PD and CFD losses (module docstring) of ``student`` and of ``teacher`` in its
    place on ``draws`` (:func:`student_losses`). ``teacher_info`` is the teacher's
    :class:`~rcfd.io.checkpoint.DiffusionInfo`; ``classifier`` frozen, ``(logits,
    features)`` of images; both models and the classifier on one device."""
    return student_losses(teacher_side(teacher, teacher_info, classifier, loss, draws), student)
