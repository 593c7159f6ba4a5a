"""The consistency-distillation loss (Song et al. 2023, Algorithm 2) as a loss object of the
shape of :class:`rcfd.losses.PDLoss` (``draw``, ``__call__(student, x0, n, noise)``, an output
with ``.loss`` and ``.terms``), so that :class:`~rcfd.training.fast_step.ObjectiveStep`
runs (and on CUDA compiles) it as one region.

On the ``N``-point grid ``k_0 = 0 < k_1 < ... < k_{N-1}`` of the teacher's schedule indices
(:func:`rcfd.core.consistency.cd_grid`), with ``n ~ U{0..N-2}`` and ``eps ~ N(0, I)``::

    z_{n+1} = alpha_{k_{n+1}} x0 + sigma_{k_{n+1}} eps
    z_n     = one unclipped teacher DDIM step k_{n+1} -> k_n from z_{n+1}
    loss    = mean_b d(f_theta(z_{n+1}, k_{n+1}), f_target(z_n, k_n))

with ``f`` the consistency function of :mod:`rcfd.core.consistency` (``lambda = 1``), the
teacher and the target network frozen and evaluated under ``no_grad``. ``n`` is 0-based
here (the paper's ``n`` runs ``1..N-1``)."""

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
    schedule_at,
)
from rcfd.losses import check_choice, draw_noise, predict


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
    ``"l2"`` or ``"pseudo-huber"``; ``prediction`` is what the networks output (``"x0"`` or
    ``"eps"``). :meth:`draw` gives ``n ~ U{0..N-2}`` and ``eps ~ N(0, I)``."""

    def __init__(self, teacher: Callable, target: Callable, schedule: Schedule, T: int,
                 time_scale: int, N: int, kind: str = "l2", prediction: str = "x0",
                 sigma_data: float = SIGMA_DATA):
        check_choice("distance", kind, DISTANCES)
        check_choice("prediction", prediction, PREDICTIONS)
        check_sampler_fits(schedule, T, time_scale)
        self.teacher, self.target, self.schedule = teacher, target, schedule
        self.T, self.time_scale, self.N = T, time_scale, N
        self.grid = cd_grid(T, time_scale, N)
        self.kind, self.prediction, self.sigma_data = kind, prediction, sigma_data

    def draw(self, generator, x0, global_batch=None, rows=None):
        """``(n, eps)`` for the global batch, this process's ``rows`` of them."""
        return draw_noise(generator, x0, 0, self.N - 2, global_batch, rows)

    def consistency(self, net: Callable, z: torch.Tensor, index: torch.Tensor, alpha, sigma,
                    a_min, s_min) -> torch.Tensor:
        """``f(z, index)`` of ``net`` (:func:`rcfd.core.consistency.consistency_output`)."""
        x0, _ = predict(net, z, index, alpha, sigma, self.prediction)
        return consistency_output(z, x0.to(z.dtype), alpha, sigma, a_min, s_min, self.sigma_data)

    def __call__(self, student: Callable, x0: torch.Tensor, n: torch.Tensor,
                 noise: torch.Tensor) -> CDOutput:
        grid = on_device(self.grid, x0.device, torch.int64)
        hi, lo = grid[n + 1], grid[n]
        z_hi, a_hi, s_hi = diffuse(x0, noise, hi, self.schedule)
        a_lo, s_lo = schedule_at(self.schedule, lo, x0)
        a_min, s_min = boundary(self.schedule, x0)
        with torch.no_grad():
            x_teacher, _ = predict(self.teacher, z_hi, hi, a_hi, s_hi, self.prediction)
            z_lo = ops.ddim_update(z_hi, x_teacher.to(z_hi.dtype), a_lo, s_lo, a_hi, s_hi,
                                   clip=False)
            f_target = self.consistency(self.target, z_lo, lo, a_lo, s_lo, a_min, s_min)
        f_student = self.consistency(student, z_hi, hi, a_hi, s_hi, a_min, s_min)
        loss = distance(f_student, f_target, self.kind).mean()
        return CDOutput(loss, f_student, f_target, z_hi, n)
