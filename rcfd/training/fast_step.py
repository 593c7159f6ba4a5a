"""The training step of a loss object, eager or compiled as one region (the fast step).

A method hands the loop an :class:`ObjectiveStep` as its job's ``loss_fn``: built from a loss
object of :mod:`rcfd.losses` (``draw(generator, x0, global_batch, rows)`` and
``__call__(model, x0, t, noise)``), it draws the step's time steps and noise eagerly from the
step's generator (for the global batch, keeping this rank's rows, so N processes see the
noise of one) and then calls the objective.

On CUDA with ``options.compile`` (the default) the loop runs :meth:`ObjectiveStep.compiled`:
the whole objective, i.e. for PD and RCFD the teacher's two-step target (under no_grad), the
student's forward and the classifier on both batches, and so also their backward, compiled
by ``torch.compile`` (Inductor, default mode) in the loop's bf16 autocast with channels_last
tensors. Only the draw stays outside the compiled region, so the generator stays eager.
Inductor fuses each GroupNorm with the SiLU after it (statistics, normalisation, affine and
activation in one generated kernel, and their backward likewise; ``tests/test_fast_step.py``
checks the generated code), so no kernel of our own is needed for them. The first step pays
the compilation (the loop logs ``compiled the <stage> step (<unit>) in N s``). The teacher,
student and classifier are inputs of the compiled code, not constants, so the halving rounds
of a stage reuse it: the second round recompiles once with the time scale symbolic, later
rounds compile nothing. Each stage compiles into a region of its own
(:func:`compiled_objective`): Dynamo keeps at most ``recompile_limit`` (8) versions per
compiled function and falls back to eager beyond that, and every stage adds its own
versions, so the stages must not count against one limit. Nothing here empties Dynamo's
cache or sets ``cudnn.benchmark``: a library function leaves process-wide state alone
(``python -m rcfd.train`` sets ``cudnn.benchmark`` on CUDA). A compile that fails is the
loop's to catch: it logs one line and trains on with the eager step. The whole step is not
captured in a CUDA graph: whether that is faster is unmeasured, so it stays off.

Without compilation (on the CPU, or ``options.compile=False``) the step is exactly the
eager one, bit for bit.

A loss object may hold networks besides the student (PD's teacher, RCFD's classifier, the
EMA *target network* of consistency distillation): they must be frozen (no parameter
requires a gradient; :func:`held_networks` finds them and :class:`ObjectiveStep` refuses a
trainable one), are never copied, and reach the compiled region as inputs like the student,
so a target that a job's ``after_step`` updates in place (:func:`rcfd.training.ema.ema_update_`)
is read with its new weights at the next step without a recompile: the step stays one region.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from torch import nn

DEFAULT_REGION = "default"


def objective_loss(objective, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
    """``(loss, terms)`` of ``objective`` on drawn ``t`` and ``noise``: the region that is
    compiled."""
    out = objective(model, x0, t, noise)
    return out.loss, out.terms


def _isolates_recompiles() -> bool:
    """Whether this torch's ``torch.compile`` takes ``isolate_recompiles`` (recent versions)."""
    return "isolate_recompiles" in inspect.signature(torch.compile).parameters


@functools.lru_cache(maxsize=32)
def compiled_objective(region: str, backend: str | Callable = "inductor") -> Callable:
    """:func:`objective_loss` compiled by ``torch.compile`` for ``region`` (the loop passes
    the stage), made once per (region, backend) and then shared: the rounds of a stage reuse
    its compiled versions, and each region counts its recompiles against a limit of its own
    (``isolate_recompiles``), so no stage needs Dynamo's cache emptied. A torch without
    ``isolate_recompiles`` (older versions) compiles every region into one shared set of
    versions, whose limit Dynamo then reports when a long study reaches it."""
    if _isolates_recompiles():
        return torch.compile(objective_loss, backend=backend, isolate_recompiles=True)
    return torch.compile(objective_loss, backend=backend)


class ObjectiveStep:
    """A job's ``loss_fn(model, x, y, info) -> (loss, terms)`` from a loss ``objective``:
    ``t, noise = objective.draw(info.generator, x, info.global_batch, info.rows)`` (eager),
    then ``objective(model, x, t, noise)``, compiled when ``compiled`` (in ``region``, see
    :func:`compiled_objective`).

    ``backend`` is ``torch.compile``'s (``"inductor"``; the tests also use ``"aot_eager"``).
    Before its first compiled call the objective runs once eagerly under no_grad, in a
    forked RNG, so that the caches it fills (the schedule tables on the device, the fused
    ops' backend routes and their extension) are only read inside the compiled region: a
    cache filled during the first compiled call would fail its guard and compile everything
    a second time."""

    def __init__(self, objective: Any, compiled: bool = False,
                 backend: str | Callable = "inductor", region: str = DEFAULT_REGION):
        if not (callable(objective) and callable(getattr(objective, "draw", None))):
            raise TypeError("objective must be a loss object of rcfd.losses: callable as "
                            "objective(model, x0, t, noise), with a draw(generator, x0, "
                            f"global_batch, rows) method; got {type(objective).__name__}")
        trainable = [name for name, net in held_networks(objective).items()
                     if any(p.requires_grad for p in net.parameters())]
        if trainable:
            raise ValueError(f"the loss object's network(s) {trainable} have parameters that "
                             "require gradients: a teacher or target network held by the "
                             "objective must be frozen (requires_grad_(False)); only the "
                             "student (the job's model) is trained")
        self.objective, self.is_compiled, self.backend = objective, compiled, backend
        self.region = region
        self._loss = compiled_objective(region, backend) if compiled else objective_loss
        self._warm = not compiled

    def compiled(self, backend: str | Callable | None = None,
                 region: str = DEFAULT_REGION) -> "ObjectiveStep":
        """The same step with the objective compiled (``backend``: this step's by default)
        in ``region`` (the loop passes the stage)."""
        return ObjectiveStep(self.objective, True, backend or self.backend, region)

    def __call__(self, model, x: torch.Tensor, y, info) -> tuple[torch.Tensor, dict]:
        t, noise = self.objective.draw(info.generator, x, info.global_batch, info.rows)
        if not self._warm:
            _warm_up(self.objective, model, x, t, noise)
            self._warm = True
        return self._loss(self.objective, model, x, t, noise)


def held_networks(objective: Any, prefix: str = "", depth: int = 2) -> dict[str, nn.Module]:
    """The networks a loss object holds as attributes (``{"teacher": ..., "pd.teacher":
    ...}``), looking ``depth`` levels into attributes that are themselves plain objects (an
    RCFD loss holds its PD loss); modules are not looked into."""
    out: dict[str, nn.Module] = {}
    for name, value in vars(objective).items() if hasattr(objective, "__dict__") else ():
        if isinstance(value, nn.Module):
            out[prefix + name] = value
        elif depth > 1 and hasattr(value, "__dict__") and not isinstance(value, type) \
                and type(value).__module__.split(".")[0] not in ("torch", "builtins"):
            out.update(held_networks(value, f"{prefix}{name}.", depth - 1))
    return out


def _warm_up(objective, model, x0, t, noise) -> None:
    """One eager, gradient-free call of ``objective`` that leaves every RNG as it found it."""
    devices = []
    if x0.is_cuda:
        devices = [torch.cuda.current_device() if x0.device.index is None else x0.device.index]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        objective(model, x0, t, noise)


def compile_step(requested: bool, device: torch.device) -> bool:
    """Whether the loop compiles a job's step: ``options.compile`` takes effect on CUDA
    only (on the CPU the step stays eager; tests compile an :class:`ObjectiveStep` on the
    CPU explicitly)."""
    return bool(requested) and torch.device(device).type == "cuda"
