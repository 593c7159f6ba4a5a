"""The consistency-model parameterisation on our schedule (Song et al. 2023, "Consistency
Models"), as pure functions: what :mod:`rcfd.methods.cd` trains and
:mod:`rcfd.samplers.consistency` samples.

Variables. Our images ``z = alpha x0 + sigma eps`` (METHOD.md, "Cosine schedule") read in
k-diffusion's variables are ``x = z / alpha = x0 + s eps`` with ``s = sigma / alpha``. The
schedule's first index is not noise-free (``abar[0] < 1``), so its ``s_min = sigma[0] /
alpha[0] > 0`` is the consistency boundary ``t_min``.

The consistency function of a network ``F`` whose output is read as an x0 prediction
(through the checkpoint's ``prediction``, "x0" or "eps")::

    f(z, i) = c_skip(s_i) x + c_out(s_i) x0_F(z, i),
    c_skip(s) = sd^2 / ((s - s_min)^2 + sd^2),   c_out(s) = 1 - c_skip(s),

``sd = sigma_data = 0.5`` (our images lie in ``[-1, 1]``; EDM's value for such data). At the
boundary ``s - s_min`` is exactly 0 (the same float subtracted from itself), so ``c_skip``
is exactly 1, ``c_out`` exactly 0 and ``f(z, 0) = z / alpha_0`` bit for bit. ``c_out = 1 -
c_skip`` (not EDM's ``(s - s_min) sd / sqrt(sd^2 + s^2)``) because ``F`` predicts x0 rather
than EDM's preconditioned residual: a student initialised from our x0-predicting teacher
starts as the teacher's denoiser blended with the identity, which is the same family of
functions with the same boundary.

The CD discretisation (:func:`cd_grid`) takes ``N`` points of the teacher's index grid
``0, time_scale, ..., T * time_scale``; :func:`distance` is the loss's metric (``"l2"``:
mean squared error; ``"pseudo-huber"``: iCT's ``sqrt(|a - b|^2 + c^2) - c`` with ``c =
0.00054 sqrt(d)``). LPIPS is not offered: its weights would have to be downloaded.

The paper's step-dependent discretisation and target decay (Song et al. 2023, Appendix C,
the schedule functions written for consistency training, eq. in its "Consistency Training"
paragraph; :func:`adaptive_N`, :func:`adaptive_mu`), for training step ``k`` of ``K``::

    N(k)  = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1
    mu(k) = exp(s0 log(mu0) / N(k))

``N`` grows from ``s0`` at ``k = 0`` to ``s1 + 1`` at ``k = K``, and ``mu`` with it (the
paper's CIFAR-10 CT: ``s0 = 2``, ``s1 = 150``, ``mu0 = 0.9``).
"""

from __future__ import annotations

import math

import torch

from rcfd.core.schedule import Schedule, per_sample

SIGMA_DATA = 0.5  # EDM's sigma_data for images in [-1, 1]
DISTANCES = ("l2", "pseudo-huber")
HUBER_C = 0.00054  # iCT: c = 0.00054 sqrt(d) for d-dimensional images


def skip_out(s: torch.Tensor, s_min: torch.Tensor | float,
             sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip(s), c_out(s))`` of the module docstring, in ``s``'s dtype; exactly
    ``(1, 0)`` where ``s == s_min``."""
    d = s - s_min
    c_skip = sigma_data ** 2 / (d * d + sigma_data ** 2)
    return c_skip, 1.0 - c_skip


def consistency_output(z: torch.Tensor, x0: torch.Tensor, alpha, sigma, alpha_min,
                       sigma_min, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """``f = c_skip(s) z / alpha + c_out(s) x0`` with ``s = sigma / alpha`` and the boundary
    ``s_min = sigma_min / alpha_min`` (coefficients: scalars, 0-dim or ``[B]`` tensors, in
    the arithmetic dtype of ``z``); ``x0`` is the network's x0 prediction at ``z``."""
    s = sigma / alpha
    c_skip, c_out = skip_out(s, sigma_min / alpha_min, sigma_data)
    x = z / per_sample(alpha, z)
    return per_sample(c_skip, z) * x + per_sample(c_out, z) * x0


def boundary(schedule: Schedule, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha[0], sigma[0])``: the schedule's first index, the consistency boundary, as
    0-dim tensors on ``like``'s device in the arithmetic dtype the losses use."""
    alpha, sigma = schedule.on(like.device, torch.float64 if like.dtype == torch.float64
                               else torch.float32)
    return alpha[0], sigma[0]


def cd_grid(T: int, time_scale: int, N: int) -> torch.Tensor:
    """The ``N``-point CD discretisation on a ``(T, time_scale)`` teacher's index grid:
    schedule indices ``floor(n T / (N - 1)) * time_scale`` for ``n = 0..N-1`` (int64), from
    the boundary ``0`` to ``T * time_scale``; strictly increasing because ``N - 1 <= T``."""
    if isinstance(N, bool) or not isinstance(N, int) or not 2 <= N <= T + 1:
        raise ValueError(f"N must be an integer in 2..T+1={T + 1} (points of the teacher's "
                         f"{T}-step grid), got {N!r}")
    n = torch.arange(N, dtype=torch.int64)
    return (n * T) // (N - 1) * time_scale


def adaptive_N(k: int, K: int, s0: int, s1: int) -> int:
    """``N(k)`` of the module docstring, in Python floats (ints in and out)."""
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1


def adaptive_mu(N: int, s0: int, mu0: float) -> float:
    """``mu(k) = exp(s0 log(mu0) / N(k))`` of the module docstring, given ``N = N(k)``."""
    return math.exp(s0 * math.log(mu0) / N)


def distance(a: torch.Tensor, b: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Per-sample ``[B]`` distance of the CD loss (module docstring), in fp32 at least:
    ``"l2"``: ``mean((a - b)^2)`` over the non-batch dims; ``"pseudo-huber"``:
    ``sqrt(sum((a - b)^2) + c^2) - c``, ``c = 0.00054 sqrt(d)``."""
    if kind not in DISTANCES:
        raise ValueError(f"distance must be one of {', '.join(map(repr, DISTANCES))}; got {kind!r}")
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    sq = (a.to(dtype) - b.to(dtype)).square().flatten(1)
    if kind == "l2":
        return sq.mean(1)
    c = HUBER_C * math.sqrt(sq.shape[1])
    return (sq.sum(1) + c * c).sqrt() - c
