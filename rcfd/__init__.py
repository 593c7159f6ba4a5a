"""rcfd: few-step diffusion sampling by distillation (RCFD and Progressive Distillation).

The hot paths run on the package's own kernels (see :mod:`rcfd.core.ops`); everything else is
plain PyTorch. Importing :mod:`rcfd` is cheap: submodules are imported where they are used,
and the public API below is imported on first access (no Triton, torch-fidelity, compiled
extension or YAML until something needs them)::

    import rcfd
    model = rcfd.load("runs/digits/pd/T1.safetensors")               # an rcfd.Model
    x = model.sample(64, steps=1, sampler="ddim", seed=0)   # float [64, C, H, W] in [-1, 1]
    m = rcfd.measure(x, "digits", extractors=["random-conv"])

* :func:`load` (:func:`rcfd.api.model.load`): a diffusion checkpoint as a :class:`Model`;
* :class:`Model` (:class:`rcfd.api.model.Model`): network, checkpoint info, schedule;
  ``.plan(steps)`` and ``.sample(n, ...)``;
* :func:`measure` (:func:`rcfd.api.measure.measure`): FID / KID / precision / recall / IS
  per extractor against a reference.
"""

import importlib

__version__ = "0.1.0"

__all__ = ["Model", "__version__", "load", "measure"]

_LAZY = {"Model": "rcfd.api.model", "load": "rcfd.api.model", "measure": "rcfd.api.measure"}


def __getattr__(name: str):
    """The public API's names, imported on first access (module docstring)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rcfd' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
