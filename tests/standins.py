"""Small stand-in models for the loss and sampler tests: an exact analytic denoiser and a tiny
conv net, so those tests depend on no real network."""

import torch


class GaussianDenoiser:
    """Exact ``E[x0 | z_t]`` for data ``x0 ~ N(mu, var I)``: ``mu + a var / (a^2 var +
    s^2) (z - a mu)``; with ``var = 0`` the data is the single point ``mu``. Predicts x0, or
    the implied eps with ``prediction="eps"``, or ``v = a eps - s x0`` with ``"v"`` (written
    out here, independently of the package's conversions)."""

    def __init__(self, schedule, mu, var=0.0, prediction="x0"):
        self.schedule, self.mu, self.var, self.prediction = schedule, mu, var, prediction

    def __call__(self, z, t_index):
        view = (-1, *[1] * (z.dim() - 1))
        a = self.schedule.alpha.to(z)[t_index.cpu()].view(view)
        s = self.schedule.sigma.to(z)[t_index.cpu()].view(view)
        x0 = self.mu + a * self.var / (a * a * self.var + s * s) * (z - a * self.mu)
        if self.prediction == "x0":
            return x0
        eps = (z - a * x0) / s
        return eps if self.prediction == "eps" else a * eps - s * x0


class TinyNet(torch.nn.Module):
    """A small conv net taking the schedule index as a per-sample bias."""

    def __init__(self, ch=1, width=16, n_index=1025):
        super().__init__()
        self.emb = torch.nn.Embedding(n_index, width)
        self.inp = torch.nn.Conv2d(ch, width, 3, padding=1)
        self.out = torch.nn.Conv2d(width, ch, 3, padding=1)

    def forward(self, z, t_index):
        h = self.inp(z) + self.emb(t_index)[:, :, None, None].to(z.dtype)
        return self.out(torch.nn.functional.silu(h))
