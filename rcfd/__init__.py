"""rcfd: few-step diffusion sampling by distillation (RCFD and Progressive Distillation).

The hot paths run on the package's own kernels (see :mod:`rcfd.core.ops`); everything else is
plain PyTorch. Importing :mod:`rcfd` is cheap: submodules are imported where they are used.
"""

__version__ = "0.1.0"
