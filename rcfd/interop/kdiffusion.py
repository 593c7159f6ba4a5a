"""An rcfd model as a k-diffusion denoiser, so ``k_diffusion.sampling.sample_*`` run on it.

k-diffusion works in the variance-exploding view of our variance-preserving schedule
(METHOD.md, "Cosine schedule"): with ``z = alpha x0 + sigma eps`` at schedule index ``k``,

    x = z / alpha,    s = sigma / alpha   (so x = x0 + s eps, and alpha = 1 / sqrt(1 + s^2)),

and a denoiser maps ``(x, s)`` to its estimate of ``x0``. :class:`KDenoiser` does that with
ONE call of our network: ``z = x / sqrt(1 + s^2)``, the network at the schedule index nearest
to ``s`` (our networks are trained on integer indices and embed them by table lookup, so the
time input cannot be interpolated; nearest is taken in ``log s``), the x0 estimate (from
``eps`` when the model predicts noise: ``x0 = x - s eps``), clipped to ``[-1, 1]`` as our
plans clip it (``clip=False`` to keep it raw). ``s = 0`` maps to index 0.

:func:`sigmas` is the ``s`` of our plan's steps. Euler in these coordinates is DDIM
(``x' = D + (s'/s)(x - D)`` is the DDIM update divided by ``alpha'``), so::

    s = sigmas(model, steps=4, dtype=torch.float64)
    x = k_diffusion.sampling.sample_euler(KDenoiser(model), x_T.double() * s[0], s)
    images = to_images(x, s[-1])        # == our DDIM from x_T, to ~1e-5

Precision: the sampler's state starts at ``x_T * s_max`` (``s_max`` = 1250 for a 64-index
model), and Euler's first step cancels it to a value of order 1; in fp32 that leaves ~1e-4 of
rounding in the images. A float64 loop (as above; the network still runs in its own dtype)
reproduces our fp32 DDIM to ~1e-5.

One difference from k-diffusion's habit: our schedule's index 0 is not noise-free (``s`` there
is ``sigma_0 / alpha_0``, 0.034 for a 64-index model), and our samplers stop there, so
:func:`sigmas` ends at that ``s`` by default and :func:`to_images` maps the result back to our
images. ``append_zero=True`` appends k-diffusion's final ``0``: one more denoiser call, at
index 0, whose output is the clean estimate (not what our DDIM returns). k-diffusion is
optional (``pip install "rcfd[kdiffusion]"``; it imports only with ``setuptools<81``); this
module does not import it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rcfd.core.schedule import Schedule, schedule_of, step_indices

__all__ = ["KDenoiser", "sigmas", "ve_sigmas", "index_of", "to_images"]


def _parts(model: Any, info: Any = None, schedule: Schedule | None = None):
    """``(net, info, schedule)`` of an :class:`rcfd.api.Model` (``.net``, ``.info``,
    ``.schedule``) or of a network with its checkpoint ``info``."""
    if info is None:
        if not all(hasattr(model, a) for a in ("net", "info")):
            raise TypeError("give an rcfd.api Model, or a network with its checkpoint info "
                            "(KDenoiser(net, info))")
        net, info, schedule = model.net, model.info, schedule or getattr(model, "schedule", None)
    else:
        net = model
    return net, info, schedule or schedule_of(info)


def ve_sigmas(schedule: Schedule) -> torch.Tensor:
    """``s[k] = sigma[k] / alpha[k]`` of every schedule index (float64, increasing)."""
    return schedule.sigma.double() / schedule.alpha.double()


def index_of(sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The schedule index (int64, like ``sigma``) whose ``s`` in ``table`` (:func:`ve_sigmas`)
    is nearest to each ``sigma`` in ``log s``; ``sigma <= 0`` gives index 0, a ``sigma`` past
    the last entry the last index."""
    table = table.to(sigma.device)
    log_t, log_s = table.log(), sigma.double().clamp_min(table[0].item() * 1e-3).log()
    hi = torch.searchsorted(log_t, log_s).clamp(1, len(table) - 1)
    nearer_lo = (log_s - log_t[hi - 1]) <= (log_t[hi] - log_s)
    return torch.where(nearer_lo, hi - 1, hi)


def sigmas(model: Any, steps: int | None = None, *, info: Any = None, append_zero: bool = False,
           device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The k-diffusion sigmas of our ``steps``-step plan (``steps`` divides ``T``; ``None``:
    ``T``): ``s`` at schedule indices ``T s_c, ..., 0`` (``s_c`` the time scale), decreasing,
    ending at index 0's ``s`` > 0, or with a final ``0`` when ``append_zero`` (module
    docstring). ``model``: as :class:`KDenoiser` takes it."""
    net, info, schedule = _parts(model, info)
    idx = torch.tensor(step_indices(info.T, info.T if steps is None else steps)) * info.time_scale
    s = ve_sigmas(schedule)[idx]
    if append_zero:
        s = torch.cat([s, s.new_zeros(1)])
    if device is None:
        device = next(net.parameters()).device if isinstance(net, nn.Module) else "cpu"
    return s.to(device=device, dtype=dtype)


def to_images(x: torch.Tensor, sigma: float | torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Our images from a k-diffusion result ``x`` at its last ``sigma``: ``z = x / sqrt(1 +
    sigma^2)`` (the VP state), clipped to ``[-1, 1]`` as our samplers finish."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).item()
    z = x / (1.0 + sigma * sigma) ** 0.5
    return z.clamp(-1.0, 1.0) if clip else z


class KDenoiser(nn.Module):
    """``denoiser(x, sigma) -> x0`` for k-diffusion's samplers (module docstring), from an
    :class:`rcfd.api.Model` or ``KDenoiser(net, info)`` (``info``: the checkpoint's
    :class:`~rcfd.io.checkpoint.DiffusionInfo`; ``schedule`` defaults to the model's).
    ``sigma`` is a ``[B]`` tensor or a scalar; ``clip`` clips the x0 estimate."""

    def __init__(self, model: Any, info: Any = None, *, schedule: Schedule | None = None,
                 clip: bool = True):
        super().__init__()
        net, info, schedule = _parts(model, info, schedule)
        if info.prediction not in ("x0", "eps", "v"):
            raise ValueError(f"KDenoiser needs an x0, eps or v model, got prediction={info.prediction!r}")
        self.net, self.info, self.clip = net, info, clip
        self.register_buffer("table", ve_sigmas(schedule), persistent=False)

    def index(self, sigma: torch.Tensor) -> torch.Tensor:
        """The schedule index (the network's time input) of each ``sigma``: :func:`index_of`."""
        return index_of(sigma, self.table)

    def _net_dtype(self) -> torch.dtype:
        params = next(self.net.parameters(), None) if isinstance(self.net, nn.Module) else None
        return torch.float32 if params is None else params.dtype

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The clipped (``clip``) x0 estimate at ``(x, sigma)``, in ``x``'s dtype; the network
        runs in its own dtype (a float64 sampler loop around an fp32 network works)."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64)
        sigma = sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma
        if tuple(sigma.shape) != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or [{x.shape[0]}], got {tuple(sigma.shape)}")
        s = sigma.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        z = x / (1 + s * s).sqrt()
        out = self.net(z.to(self._net_dtype()), self.index(sigma)).to(x.dtype)
        x0 = out
        if self.info.prediction == "eps":
            x0 = x - s * out
        elif self.info.prediction == "v":  # x0 = alpha z - sigma v, alpha = 1/sqrt(1+s^2)
            x0 = x / (1 + s * s) - s * out / (1 + s * s).sqrt()
        return x0.clamp(-1.0, 1.0) if self.clip else x0
