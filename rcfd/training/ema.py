"""Exponential moving averages of a network's weights: the one update the training loop's EMA
(:class:`rcfd.training.optim.EMA`) runs after every optimiser step, public so that a method
can keep averages of its own with exactly the same math, e.g. the *target network* of
consistency distillation, updated from a job's ``after_step`` hook::

    def after_step(steps_done, student):
        ema_update_(target, student, mu)

The update is ``target = decay * target + (1 - decay) * source`` on every floating-point
parameter (one ``torch._foreach_lerp_``, in place, without autograd), and the buffers (e.g.
running statistics) are copied from the source. Parameters are matched by name, so the
source may be wrapped (DistributedDataParallel, ``torch.compile``): the wrappers are
removed first.
"""

from __future__ import annotations

import torch
from torch import nn

from rcfd.io.checkpoint import unwrap_model


def ema_pairs(target: nn.Module, source: nn.Module) -> tuple[list, list, list, list]:
    """``(target params, source params, target buffers, source buffers)``: the matching
    lists :func:`ema_lerp_` updates; the floating-point parameters of ``target``, paired by
    name with ``source``'s (detached), and both modules' buffers in order. A parameter of
    the target that the source lacks, or different buffer counts, is a ``ValueError``."""
    inner = unwrap_model(source)
    src = dict(inner.named_parameters())
    names = [n for n, p in target.named_parameters() if p.is_floating_point()]
    missing = [n for n in names if n not in src]
    target_buffers, source_buffers = list(target.buffers()), list(inner.buffers())
    if missing or len(target_buffers) != len(source_buffers):
        raise ValueError(f"an EMA target must have the source's parameters and buffers; the "
                         f"source lacks {missing[:3]} (buffers: {len(target_buffers)} in the "
                         f"target, {len(source_buffers)} in the source)")
    own = dict(target.named_parameters())
    return ([own[n] for n in names], [src[n].detach() for n in names], target_buffers,
            source_buffers)


def check_decay(decay: float) -> float:
    """``decay`` as a float in [0, 1] (1 keeps the target as it is), or a ``ValueError``."""
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"an EMA decay must be in [0, 1], got {decay}")
    return float(decay)


@torch.no_grad()
def ema_lerp_(pairs: tuple[list, list, list, list], decay: float) -> None:
    """The update on lists from :func:`ema_pairs`: ``lerp`` every target parameter towards
    its source by ``1 - decay`` (one foreach call), copy the buffers."""
    own, src, own_buffers, src_buffers = pairs
    if own:
        torch._foreach_lerp_(own, src, 1.0 - decay)
    for b, s in zip(own_buffers, src_buffers):
        b.copy_(s)


def ema_update_(target: nn.Module, source: nn.Module, decay: float) -> None:
    """Update ``target`` in place towards ``source``: ``target = decay * target + (1 -
    decay) * source`` on every floating-point parameter, the buffers copied; the loop's own
    EMA math (bit for bit: the loop's :class:`~rcfd.training.optim.EMA` runs
    :func:`ema_lerp_` on the same lists). ``decay`` in [0, 1]; no autograd is recorded and
    ``target``'s ``requires_grad`` flags are left as they are (freeze a target network with
    ``requires_grad_(False)``)."""
    ema_lerp_(ema_pairs(target, source), check_decay(decay))
