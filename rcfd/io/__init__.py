"""Files: writes that are atomic (:mod:`~rcfd.io.files`), the safetensors format read and
written by our own checked code (:mod:`~rcfd.io.safetensors`), ``torch.save`` files that
load without running code (:mod:`~rcfd.io.safeload`), model checkpoints as safetensors with
either format read by content (:mod:`~rcfd.io.modelfile`), the checkpoint formats of our
models and the reference code's (:mod:`~rcfd.io.checkpoint`), and sample grids as PNGs
(:mod:`~rcfd.io.grids`). The bottom layer with :mod:`rcfd.core` and :mod:`rcfd.data`:
``files``, ``safetensors``, ``safeload`` and ``modelfile`` import nothing of the package but
its errors and each other (in that order)."""
