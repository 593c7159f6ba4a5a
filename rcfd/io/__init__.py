"""Files: writes that are atomic (:mod:`~rcfd.io.files`), the safetensors format read and
written by our own checked code (:mod:`~rcfd.io.safetensors`), ``torch.save`` files that
load without running code (:mod:`~rcfd.io.safeload`), model checkpoints as safetensors with
either format read by content (:mod:`~rcfd.io.modelfile`), state dicts checked against
their model before it is built (:mod:`~rcfd.io.statedict`), the checkpoint formats of our
models, the reference code's and diffusers folders' (:mod:`~rcfd.io.checkpoint`; the folders
through :mod:`rcfd.interop.diffusers_load`), and sample grids as PNGs
(:mod:`~rcfd.io.grids`). The bottom layer with :mod:`rcfd.core` and :mod:`rcfd.data`:
``files``, ``safetensors``, ``safeload`` and ``modelfile`` import nothing of the package but
its errors and each other (in that order)."""
