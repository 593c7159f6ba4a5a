"""CPU threads: a fixed default, so that a seed gives the same numbers whatever the machine's
load.

torch's CPU kernels split reductions by thread, so the thread count changes the order of
floating-point sums and with it the last bits of every result; a count that followed the
machine's load made seeded runs differ from run to run. The default is therefore the number
of cores this process may run on (its affinity set), at most :data:`MAX_DEFAULT_THREADS`;
``--threads N`` (``threads`` in the config) chooses another. The count in use is recorded with
every run and a resume with another count is refused (it would not continue exactly). On a
machine busy with other work, fewer threads than cores can be much faster: pass
``--threads 1`` there.
"""

from __future__ import annotations

import os

import torch

MAX_DEFAULT_THREADS = 16


def default_threads() -> int:
    """The cores this process may run on (its affinity set), at most
    :data:`MAX_DEFAULT_THREADS`; a property of the machine, not of its load."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_DEFAULT_THREADS, cores or 1))


def configure_threads(threads: int | None = None, processes: int = 1) -> int:
    """Set torch's intra-op threads and return the number: ``threads``, or an equal share of
    :func:`default_threads` among the ``processes`` of this job on the machine."""
    if threads is None:
        threads = max(1, default_threads() // max(1, processes))
    torch.set_num_threads(threads)
    return threads
