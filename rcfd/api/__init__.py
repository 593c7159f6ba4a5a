"""The public Python API, re-exported lazily by :mod:`rcfd` (``rcfd.load``, ``rcfd.measure``):

* :mod:`~rcfd.api.model`: :func:`~rcfd.api.model.load` a diffusion checkpoint into a
  :class:`~rcfd.api.model.Model` that plans and samples without re-passing ``T``,
  ``time_scale`` or ``prediction``;
* :mod:`~rcfd.api.measure`: :func:`~rcfd.api.measure.measure` images against a reference
  on the evaluation panel.

Importing this package imports neither module, so ``rcfd.load`` never pulls in the
evaluation code (and with it torch-fidelity).
"""
