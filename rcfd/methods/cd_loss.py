"""The consistency-distillation loss (Song et al. 2023, Algorithm 2) as a loss object of the
shape of :class:`rcfd.losses.PDLoss` (``draw``, ``__call__(student, x0, n, noise)``, an output
with ``.loss`` and ``.terms``), so that :class:`~rcfd.training.fast_step.ObjectiveStep`
runs (and on CUDA compiles) it as one region.

On the ``N``-point grid ``k_0 = 0 < k_1 < ... < k_{N-1}`` of the teacher's schedule indices
(:func:`rcfd.core.consistency.cd_grid`), with ``n ~ U{0..N-2}`` and ``eps ~ N(0, I)``::

    z_{n+1} = alpha_{k_{n+1}} x0 + sigma_{k_{n+1}} eps
    z_n     = one unclipped teacher ODE step k_{n+1} -> k_n from z_{n+1}
    loss    = mean_b d(f_theta(z_{n+1}, k_{n+1}), f_target(z_n, k_n))

with ``f`` the consistency function of :mod:`rcfd.core.consistency` (``lambda = 1``), the
teacher and the target network frozen and evaluated under ``no_grad``. ``n`` is 0-based
here (the paper's ``n`` runs ``1..N-1``).

The teacher's step (:func:`teacher_step`, ``solver``) solves the probability-flow ODE in
the variables ``x = z / alpha``, ``s = sigma / alpha``, where it reads ``dx/ds = eps_hat``
(EDM's ``dx/dsigma = (x - D(x)) / sigma``, Karras et al. 2022, eq. 3 with ``sigma(t) = t``):

- ``"ddim"``: one Euler step, ``x_n = x_{n+1} + (s_n - s_{n+1}) eps_hat(z_{n+1})``, which is
  exactly the DDIM update (one teacher call, first order);
- ``"heun"``: EDM's Heun step (Karras et al. 2022, Algorithm 1, lines 5-8; the step the CD
  paper's CIFAR-10 runs take): the Euler step as a predictor ``z'``, then ``x_n = x_{n+1} +
  (s_n - s_{n+1}) (eps_hat(z_{n+1}) + eps_hat(z')) / 2`` (two teacher calls, second order).
  ``s_n > 0`` at every grid point (our schedule's first index is not noise-free), so the
  corrector is taken on every step, the last one included."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from rcfd.core import ops
from rcfd.core.consistency import (
    DISTANCES,
    SIGMA_DATA,
    boundary,
    cd_grid,
    consistency_output,
    distance,
)
from rcfd.core.schedule import (
    PREDICTIONS,
    Schedule,
    check_sampler_fits,
    diffuse,
    on_device,
    per_sample,
    schedule_at,
)
from rcfd.losses import check_choice, draw_noise, predict
from rcfd.training.fast_step import DEFAULT_REGION, ObjectiveStep

SOLVERS = ("ddim", "heun")


def heun_update(z_hi: torch.Tensor, eps_hi: torch.Tensor, eps_lo: torch.Tensor, a_hi, s_hi,
                a_lo, s_lo) -> torch.Tensor:
    """The Heun corrector (module docstring): ``z_lo = alpha_lo (z_hi / alpha_hi + (s_lo -
    s_hi) (eps_hi + eps_lo) / 2)`` with ``s = sigma / alpha``; coefficients scalars or ``[B]``
    tensors, arithmetic in ``z_hi``'s dtype."""
    ds = per_sample(s_lo / a_lo - s_hi / a_hi, z_hi)
    x = z_hi / per_sample(a_hi, z_hi) + ds * (0.5 * (eps_hi + eps_lo))
    return (per_sample(a_lo, z_hi) * x).to(z_hi.dtype)


def teacher_step(teacher: Callable, z_hi: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor,
                 coefs: tuple, prediction: str = "x0", solver: str = "ddim") -> torch.Tensor:
    """One unclipped probability-flow step of ``teacher`` from index ``hi`` to ``lo``
    (module docstring), ``coefs = (alpha_hi, sigma_hi, alpha_lo, sigma_lo)``: ``"ddim"``
    (one call) or ``"heun"`` (two). Call it under ``no_grad``."""
    a_hi, s_hi, a_lo, s_lo = coefs
    x_teacher, eps_hi = predict(teacher, z_hi, hi, a_hi, s_hi, prediction)
    z_lo = ops.ddim_update(z_hi, x_teacher.to(z_hi.dtype), a_lo, s_lo, a_hi, s_hi, clip=False)
    if solver == "ddim":
        return z_lo
    _, eps_lo = predict(teacher, z_lo, lo, a_lo, s_lo, prediction)
    return heun_update(z_hi, eps_hi.to(z_hi.dtype), eps_lo.to(z_hi.dtype), a_hi, s_hi, a_lo, s_lo)


class CDOutput(NamedTuple):
    """What :class:`CDLoss` computed: the loss and the tensors a caller may reuse."""

    loss: torch.Tensor      # 0-dim, with grad
    f_student: torch.Tensor  # f_theta(z_{n+1}, k_{n+1}) (with grad)
    f_target: torch.Tensor   # f_target(z_n, k_n) (no grad)
    z_next: torch.Tensor     # z_{n+1}
    n: torch.Tensor          # grid positions [B]: the pair (k_n, k_{n+1})

    @property
    def terms(self) -> dict:
        """Nothing beyond the loss to log."""
        return {}


class CDLoss:
    """Consistency distillation (module docstring) of a ``(T, time_scale)`` ``teacher`` into
    a student whose EMA ``target`` network gives the targets; ``N`` grid points, distance
    ``"l2"`` or ``"pseudo-huber"``; ``prediction`` is what the teacher outputs (``"x0"``,
    ``"eps"`` or ``"v"``), ``student_prediction`` what the student and its target output
    (``None``: the teacher's); ``solver``: the teacher's step, ``"ddim"`` or ``"heun"`` (:func:`teacher_step`).
    :meth:`draw` gives ``n ~ U{0..N-2}`` and ``eps ~ N(0, I)``."""

    def __init__(self, teacher: Callable, target: Callable, schedule: Schedule, T: int,
                 time_scale: int, N: int, kind: str = "l2", prediction: str = "x0",
                 sigma_data: float = SIGMA_DATA, solver: str = "ddim",
                 student_prediction: str | None = None):
        student_prediction = prediction if student_prediction is None else student_prediction
        check_choice("distance", kind, DISTANCES)
        check_choice("solver", solver, SOLVERS)
        check_choice("prediction", prediction, PREDICTIONS)
        check_choice("student_prediction", student_prediction, PREDICTIONS)
        check_sampler_fits(schedule, T, time_scale)
        self.teacher, self.target, self.schedule = teacher, target, schedule
        self.T, self.time_scale, self.N = T, time_scale, N
        self.grid = cd_grid(T, time_scale, N)
        self._grids = {N: self.grid}
        self.kind, self.prediction, self.sigma_data = kind, prediction, sigma_data
        self.solver, self.student_prediction = solver, student_prediction

    def set_N(self, N: int) -> None:
        """Use the ``N``-point grid from now on (the adaptive schedule, :class:`CDStep`);
        each grid is made once and kept, so a grid returns as the same tensor."""
        if N not in self._grids:
            self._grids[N] = cd_grid(self.T, self.time_scale, N)
        self.N, self.grid = N, self._grids[N]

    def draw(self, generator, x0, global_batch=None, rows=None):
        """``(n, eps)`` for the global batch, this process's ``rows`` of them."""
        return draw_noise(generator, x0, 0, self.N - 2, global_batch, rows)

    def consistency(self, net: Callable, z: torch.Tensor, index: torch.Tensor, alpha, sigma,
                    a_min, s_min) -> torch.Tensor:
        """``f(z, index)`` of ``net`` (:func:`rcfd.core.consistency.consistency_output`)."""
        x0, _ = predict(net, z, index, alpha, sigma, self.student_prediction)
        return consistency_output(z, x0.to(z.dtype), alpha, sigma, a_min, s_min, self.sigma_data)

    def __call__(self, student: Callable, x0: torch.Tensor, n: torch.Tensor,
                 noise: torch.Tensor) -> CDOutput:
        grid = on_device(self.grid, x0.device, torch.int64)
        hi, lo = grid[n + 1], grid[n]
        z_hi, a_hi, s_hi = diffuse(x0, noise, hi, self.schedule)
        a_lo, s_lo = schedule_at(self.schedule, lo, x0)
        a_min, s_min = boundary(self.schedule, x0)
        with torch.no_grad():
            z_lo = teacher_step(self.teacher, z_hi, hi, lo, (a_hi, s_hi, a_lo, s_lo),
                                self.prediction, self.solver)
            f_target = self.consistency(self.target, z_lo, lo, a_lo, s_lo, a_min, s_min)
        f_student = self.consistency(student, z_hi, hi, a_hi, s_hi, a_min, s_min)
        loss = distance(f_student, f_target, self.kind).mean()
        return CDOutput(loss, f_student, f_target, z_hi, n)


class CDStep(ObjectiveStep):
    """The training step of a :class:`CDLoss` whose ``N`` follows the training step:
    before each step ``objective.set_N(N_at(info.step))`` (eager, outside any compiled
    region; the grid's device copy is made there too), then the plain
    :class:`~rcfd.training.fast_step.ObjectiveStep`. ``N`` depends on the step index
    alone, so a resumed run draws exactly what a straight one does."""

    def __init__(self, objective: CDLoss, N_at: Callable[[int], int], compiled: bool = False,
                 backend="inductor", region: str = DEFAULT_REGION):
        super().__init__(objective, compiled, backend, region)
        self.N_at = N_at

    def compiled(self, backend=None, region: str = DEFAULT_REGION) -> "CDStep":
        """The same step compiled (:meth:`ObjectiveStep.compiled`), still following ``N``."""
        return CDStep(self.objective, self.N_at, True, backend or self.backend, region)

    def __call__(self, model, x: torch.Tensor, y, info):
        self.objective.set_N(self.N_at(info.step))
        on_device(self.objective.grid, x.device, torch.int64)
        return super().__call__(model, x, y, info)
