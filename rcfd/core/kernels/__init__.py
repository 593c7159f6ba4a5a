"""Triton kernels, one op per module: ``_kernel`` -> launcher -> autograd / custom op.

Modules are imported where they are used (:mod:`rcfd.core.ops` chooses the backend), so
importing this package does not import Triton.
"""
