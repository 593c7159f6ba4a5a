"""The resumable state of one unit of training, and what a resume must match.

A state file (``<stage>/<unit>.train.pt``) holds the model, EMA, optimizer, step, every RNG
state (as tensors and lists, so it stays ``weights_only`` loadable), the data position, the
method's own state (a job's ``state`` modules: target networks, buffers; see
:func:`method_state`), and the unit's *identity*: its config, the data it trains on (spec and a fingerprint of the
images), the world size, the CPU thread count and the library versions. A resume continues
exactly (on the CPU: the same losses, bit for bit) or is refused with what changed
(:func:`check_identity`); it is never silently something else.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from rcfd import __version__
from rcfd.core.seeds import derive_seed
from rcfd.errors import ResumeError, StageExistsError

STATE_FORMAT = "rcfd-train-state"


def stage_seed(seed: int, *key: Any) -> int:
    """A 63-bit seed that is a hash of ``(seed, *key)``, e.g. ``(seed, "pd", "T16", rank)``
    (:func:`rcfd.core.seeds.derive_seed`)."""
    return derive_seed(seed, *key)


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG state as tensors/lists/ints (``weights_only``-safe)."""
    v, s, g = random.getstate()
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": [v, list(s), g],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "generator": None if generator is None else generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    v, s, g = state["python"]
    random.setstate((v, tuple(s), g))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])


def identity(config: dict, steps: int, data: dict, world_size: int, device: torch.device) -> dict:
    """What a resume of this unit must match: the config and step count, the data (spec and
    fingerprint), the world size, and, where they change the numbers, the CPU thread count
    and the library versions."""
    return {"config": config, "steps": steps, "data": data, "world_size": world_size,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "rcfd": __version__, "torch": str(torch.__version__)}


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


_ADVICE = {
    "config": "resume with the same config",
    "steps": "resume with the same config",
    "data": "resume on the same data",
    "world_size": "resume with the same number of processes",
    "threads": "resume with the same --threads",
    "rcfd": "resume with the rcfd version that started it",
    "torch": "resume with the torch version that started it",
}


def check_identity(path, saved: dict, now: dict) -> None:
    """Raise :class:`~rcfd.errors.ResumeError` naming every difference between the
    identity a state was written with and this run's."""
    changed = [k for k in _ADVICE if saved.get(k) != now.get(k)]
    if not changed:
        return
    details = []
    for k in changed:
        sub = _diff(saved.get(k), now.get(k), f"{k}.")
        details += sub[:4] if sub else [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"]
    advice = "; ".join(dict.fromkeys(_ADVICE[k] for k in changed))
    raise ResumeError(f"cannot resume {path}: it would not continue exactly, because "
                      f"{', '.join(details)}. To continue it, {advice}; or pass --overwrite "
                      "to train this unit again from scratch")


def read_state(path, state: Any) -> dict:
    """Check that a loaded object is a training state of ours."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise StageExistsError(f"{path} is not a training state of rcfd; delete it or pass "
                               "--overwrite")
    missing = [k for k in ("identity", "model", "optimizer", "rng", "data", "step") if k not in state]
    if missing:
        raise ResumeError(f"cannot resume {path}: it lacks {missing} (written by an older rcfd); "
                          "pass --overwrite to train this unit again")
    return state


def method_state(modules: Mapping[str, nn.Module]) -> dict:
    """What a state file keeps of a job's ``state`` (the method's own modules: target
    networks, buffers): ``{name: state_dict}``, tensors only, so it stays ``weights_only``
    loadable."""
    return {name: module.state_dict() for name, module in modules.items()}


def load_method_state(path, saved: dict, modules: Mapping[str, nn.Module]) -> None:
    """Load a state file's :func:`method_state` back into the same-named ``modules`` (in
    place, keeping their devices), or raise :class:`~rcfd.errors.ResumeError` when the names
    differ from what the job keeps now (a state written by another method or an older
    rcfd)."""
    kept = saved.get("method_state") or {}
    if set(kept) != set(modules):
        raise ResumeError(f"cannot resume {path}: it holds the method state "
                          f"{sorted(kept) or 'none'} but this job keeps {sorted(modules) or 'none'}; "
                          "pass --overwrite to train this unit again")
    for name, module in modules.items():
        module.load_state_dict(kept[name])
