"""Optimization for the training loop (:mod:`rcfd.training.loop`): the optimizer and its
learning-rate schedule (:class:`OptimSpec`, :func:`lr_at`, :func:`make_optimizer`), gradient
norms and clipping (:func:`grad_norm`), and the exponential moving average of the weights
(:class:`EMA`). The learning rate is a pure function of the step, so a resumed run needs no
scheduler state.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from rcfd.io.checkpoint import unwrap_model
from rcfd.training.ema import ema_lerp_, ema_pairs

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "multistep")


@dataclass(frozen=True)
class OptimSpec:
    """Optimizer and learning-rate schedule: ``lr * warmup(step) * schedule(step)`` with a
    linear warmup over ``warmup`` steps and ``"constant"``, ``"cosine"`` (annealed to 0 at
    the last step) or ``"multistep"`` (times ``decay`` at each fraction in ``milestones``)."""

    kind: str = "adam"
    lr: float = 2e-4
    schedule: str = "constant"
    warmup: int = 0
    milestones: tuple[float, ...] = ()
    decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    fused: bool = False

    def __post_init__(self):
        if self.kind not in OPTIMIZERS or self.schedule not in SCHEDULES:
            raise ValueError(f"kind must be one of {OPTIMIZERS} and schedule one of "
                             f"{SCHEDULES}; got {self.kind!r}, {self.schedule!r}")


def lr_at(spec: OptimSpec, step: int, total: int) -> float:
    """Learning rate of the 0-based ``step`` of ``total``: a pure function of the step, so
    a resumed run needs no scheduler state."""
    factor = min(1.0, (step + 1) / spec.warmup) if spec.warmup else 1.0
    if spec.schedule == "cosine":
        factor *= 0.5 * (1.0 + math.cos(math.pi * step / total))
    elif spec.schedule == "multistep":
        factor *= spec.decay ** sum(step >= m * total for m in spec.milestones)
    return spec.lr * factor


def make_optimizer(params: list, spec: OptimSpec, fused: bool = False) -> torch.optim.Optimizer:
    """Adam (betas 0.9/0.999, no weight decay unless set) or SGD with momentum; the fused
    CUDA implementation when ``fused``."""
    if spec.kind == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay,
                                fused=fused or None)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                           weight_decay=spec.weight_decay, fused=fused or None)


def grad_norm(params: list, clip: float | None) -> torch.Tensor:
    """Total gradient 2-norm, after clipping it to ``clip`` when given (the returned norm
    is the one before clipping, as ``clip_grad_norm_`` reports it)."""
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())


class EMA:
    """Exponential moving average of a model's floating-point parameters,
    ``ema = decay * ema + (1 - decay) * param`` after every optimizer step, updated in place
    with one ``torch._foreach_lerp_`` (:mod:`rcfd.training.ema`); buffers are copied.
    ``self.model`` is the averaged copy (eval mode, no grads), the weights sampled from and
    saved as ``ema_state_dict``."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)

    def _pairs(self, model: nn.Module):
        """Matching (EMA, model) parameter and buffer lists (:func:`rcfd.training.ema.ema_pairs`),
        built once per model."""
        if getattr(self, "_source", None) is not model:
            self._lists = ema_pairs(self.model, model)
            self._source = model
        return self._lists

    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model`` (:func:`rcfd.training.ema.ema_lerp_`, the
        math of the public :func:`rcfd.training.ema.ema_update_`)."""
        ema_lerp_(self._pairs(model), self.decay)
