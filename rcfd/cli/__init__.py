"""The command lines: :mod:`~rcfd.cli.train` (the study), :mod:`~rcfd.cli.sample` (images from
a checkpoint), :mod:`~rcfd.cli.evaluate` (metrics of a checkpoint) and :mod:`~rcfd.cli.export`
(a checkpoint to a diffusers folder or an ``.npz`` of samples). Each parses its
arguments, builds a config and calls the library; nothing in :mod:`rcfd` imports from here.
Shared options and error handling are :mod:`~rcfd.cli.common`."""

import os
import signal
import sys

STOPPED = "stopped by SIGTERM outside a training step; nothing was in progress to save"


def _stop(signum, frame):
    """Exit at once: nothing is in progress to save. ``SystemExit`` raised inside an import
    being executed (numpy's, scipy's) can end in a traceback at shutdown instead."""
    print(STOPPED, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(0)


def stop_cleanly_on_sigterm() -> None:
    """Until a command installs its own handlers, SIGTERM stops it with exit code 0 and a
    message (instead of the default exit 143), also while its modules are being imported.
    Called by the ``python -m rcfd.<command>`` entry points before anything heavy loads."""
    signal.signal(signal.SIGTERM, _stop)
