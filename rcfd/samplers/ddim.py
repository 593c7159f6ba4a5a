"""The deterministic DDIM sampler (METHOD.md, "DDIM step"; = DPM-Solver-1 in data
prediction, "Training-free samplers for the base model").

Over a plan ``t_0 > ... > t_K`` (schedule coefficients ``alpha_i, sigma_i``), from
``z_0 = x_T``, for ``i = 1..K``::

    x0_{i-1} = clip(x0_theta(z_{i-1}, t_{i-1}), -1, 1)
    z_i      = alpha_i x0_{i-1} + sigma_i (z_{i-1} - alpha_{i-1} x0_{i-1}) / sigma_{i-1}
             = (sigma_i / sigma_{i-1}) z_{i-1} - alpha_i (exp(-h_i) - 1) x0_{i-1}

with ``h_i = lambda_i - lambda_{i-1}``, ``lambda = log(alpha / sigma)``; the result is
``clip(z_K, -1, 1)`` (raw ``z_K`` when the plan does not clip). The update is
:func:`rcfd.core.ops.ddim_update`, the one place its arithmetic is written; the other samplers
call it through :func:`ddim_transfer` with another ``x0``.
"""

from __future__ import annotations

from typing import Callable

import torch

from rcfd.core import ops
from rcfd.samplers.plan import Plan, check_inputs, finish, predict_x0


def ddim_transfer(z: torch.Tensor, x0: torch.Tensor, plan: Plan, i: int) -> torch.Tensor:
    """The DDIM update from ``t_i`` to ``t_{i+1}`` with the data estimate ``x0`` (not
    clipped here: the samplers clip the model's predictions, never their combinations)::

        z_{i+1} = alpha_{i+1} x0 + sigma_{i+1} (z_i - alpha_i x0) / sigma_i
    """
    return ops.ddim_update(z, x0, plan.alpha[i + 1], plan.sigma[i + 1], plan.alpha[i],
                           plan.sigma[i], clip=False)


@torch.no_grad()
def ddim(model: Callable, x_T: torch.Tensor, plan: Plan) -> torch.Tensor:
    """DDIM from ``x_T`` over ``plan`` (module docstring): ``K`` model calls, images
    ``clip(z_K, -1, 1)`` (raw ``z_K`` when ``plan.clip`` is off)."""
    check_inputs(x_T, plan)
    z = x_T
    for i in range(plan.num_steps):
        z = ddim_transfer(z, predict_x0(model, z, plan, i), plan, i)
    return finish(z, plan)
