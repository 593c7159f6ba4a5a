"""DPM-Solver++(2M): the second-order multistep solver in data prediction (Lu et al. 2022;
METHOD.md, "Training-free samplers for the base model").

Over a plan ``t_0 > ... > t_K`` with ``lambda_i = log(alpha_i / sigma_i)`` and
``h_i = lambda_i - lambda_{i-1}``, from ``z_0 = x_T``, with ``x0_i`` the clipped model
prediction at ``(z_i, t_i)``::

    D_1 = x0_0                                                   (the first step is DDIM)
    D_i = (1 + 1/(2 r_i)) x0_{i-1} - (1/(2 r_i)) x0_{i-2},   r_i = h_{i-1} / h_i   (i >= 2)
    z_i = (sigma_i / sigma_{i-1}) z_{i-1} - alpha_i (exp(-h_i) - 1) D_i

Since ``alpha_i - sigma_i alpha_{i-1} / sigma_{i-1} = alpha_i (1 - exp(-h_i))``, the last
line is exactly the DDIM update with ``D_i`` in place of ``x0``:
``z_i = alpha_i D_i + sigma_i (z_{i-1} - alpha_{i-1} D_i) / sigma_{i-1}``, so the step
is :func:`rcfd.samplers.ddim.ddim_transfer` (the fused :func:`rcfd.core.ops.ddim_update`) applied
to ``D_i``. ``D_i`` is an extrapolation and is not clipped (only the model's predictions
are). With one step it is DDIM; its global error is second order in the step size.
"""

from __future__ import annotations

from typing import Callable

import torch

from rcfd.samplers.ddim import ddim_transfer
from rcfd.samplers.plan import Plan, check_inputs, finish, predict_x0


def half_inverse_ratios(plan: Plan) -> torch.Tensor:
    """``1 / (2 r_i) = h_i / (2 h_{i-1})`` for ``i = 2..K`` (a ``[K-1]`` tensor on the plan's
    device, computed there: no host sync)."""
    lam = torch.log(plan.alpha / plan.sigma)
    h = lam[1:] - lam[:-1]
    return h[1:] / (2 * h[:-1])


@torch.no_grad()
def dpm_solver_2m(model: Callable, x_T: torch.Tensor, plan: Plan) -> torch.Tensor:
    """DPM-Solver++(2M) from ``x_T`` over ``plan`` (module docstring): ``K`` model calls,
    images ``clip(z_K, -1, 1)`` (raw ``z_K`` when ``plan.clip`` is off)."""
    check_inputs(x_T, plan)
    c = half_inverse_ratios(plan)
    z, x0_prev = x_T, None
    for i in range(plan.num_steps):
        x0 = predict_x0(model, z, plan, i)
        d = x0 if x0_prev is None else x0 + c[i - 1] * (x0 - x0_prev)
        z = ddim_transfer(z, d, plan, i)
        x0_prev = x0
    return finish(z, plan)
