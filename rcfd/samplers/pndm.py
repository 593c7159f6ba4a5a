"""PNDM's pseudo linear multistep sampler, PLMS (Liu et al. 2022; METHOD.md, "Training-free
samplers for the base model").

Over a plan ``t_0 > ... > t_K``, from ``z_0 = x_T``: at step ``i`` the model gives the
clipped ``x0_i`` and ``e_0 = eps_i = (z_i - alpha_i x0_i) / sigma_i``; with ``e_1, e_2,
e_3`` the noise estimates of the steps before (newest first), the multistep estimate is::

    eps' = e_0                                        (step 1)
         = (3 e_0 - e_1) / 2                          (step 2)
         = (23 e_0 - 16 e_1 + 5 e_2) / 12             (step 3)
         = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24    (steps 4..K)

and the step is PNDM's transfer ``phi``, the DDIM update driven by ``eps'``::

    x0'     = (z_i - sigma_i eps') / alpha_i
    z_{i+1} = alpha_{i+1} x0' + sigma_{i+1} (z_i - alpha_i x0') / sigma_i    (= ... + sigma_{i+1} eps')

done by :func:`rcfd.samplers.ddim.ddim_transfer` (:func:`rcfd.core.ops.ddim_update`) on ``x0'``,
computed as ``x0_i - (sigma_i / alpha_i) (eps' - e_0)`` (the same value, without
dividing all of ``z_i`` by a small ``alpha_i``). ``x0'`` is not clipped.

Warm-up: this is the MULTISTEP warm-up (the lower-order Adams-Bashforth formulas above, one
model call per step), not the paper's pseudo Runge-Kutta one (four calls per step for the
first three steps). The price is order: the first step is a DDIM (Euler) step with local
error ``O(h^2)``, so the global error is second order in the step size, not fourth (the
formulas are also exact only for steps of equal length in ``sigma / alpha``, the variable of
the transfer, which steps uniform in ``t`` or ``lambda`` are not; that too leaves second
order). Measured on Gaussian data with a closed-form answer (tests/test_samplers_order.py):
the error falls ~4-fold per doubling of the steps, like DPM-Solver++(2M)'s. With uneven step
lists the weights stay those of equal steps. With one step it is DDIM.
"""

from __future__ import annotations

from typing import Callable

import torch

from rcfd.samplers.ddim import ddim_transfer
from rcfd.samplers.plan import Plan, check_inputs, eps_of, finish, predict_x0

# Adams-Bashforth weights of e_0, e_1, ... (newest first), by number of estimates known.
PLMS_WEIGHTS = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def plms_correction(history: list[torch.Tensor]) -> torch.Tensor | None:
    """``eps' - e_0`` for the estimates ``history = [e_0, e_1, ...]`` (newest first, at most
    four), by the weights of :data:`PLMS_WEIGHTS`; ``None`` for one estimate (``eps' = e_0``)."""
    weights = PLMS_WEIGHTS[len(history) - 1]
    if len(weights) == 1:
        return None
    out = (weights[0] - 1.0) * history[0]
    for w, e in zip(weights[1:], history[1:]):
        out = out + w * e
    return out


@torch.no_grad()
def pndm(model: Callable, x_T: torch.Tensor, plan: Plan) -> torch.Tensor:
    """PLMS with the multistep warm-up from ``x_T`` over ``plan`` (module docstring): ``K``
    model calls, images ``clip(z_K, -1, 1)`` (raw ``z_K`` when ``plan.clip`` is off)."""
    check_inputs(x_T, plan)
    z, history = x_T, []
    for i in range(plan.num_steps):
        x0 = predict_x0(model, z, plan, i)
        history = [eps_of(z, x0, plan, i), *history[:3]]
        correction = plms_correction(history)
        if correction is not None:
            x0 = x0 - (plan.sigma[i] / plan.alpha[i]) * correction
        z = ddim_transfer(z, x0, plan, i)
    return finish(z, plan)
