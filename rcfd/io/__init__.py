"""Files: writes that are atomic (:mod:`~rcfd.io.files`), checkpoints that load without
running code (:mod:`~rcfd.io.safeload`), the checkpoint formats of our models and the
reference code's (:mod:`~rcfd.io.checkpoint`), and sample grids as PNGs
(:mod:`~rcfd.io.grids`). The bottom layer with :mod:`rcfd.core` and :mod:`rcfd.data`:
``files`` and ``safeload`` import nothing of the package but its errors."""
