"""What every command line of the package shares: how errors end a command, and the options
that load a diffusion checkpoint, pick a device, a sampler and a seed (each defined once).

Every command runs through :func:`run_cli`, which turns errors into one line on stderr:

* a user mistake (:class:`~rcfd.errors.UsageError` and its kinds, a missing file, an invalid
  value): ``error: <what> <how to fix>``, exit code 2;
* the machine refusing (a read-only directory, a full disk): one line naming the path, exit 1;
* a diverged training run: its message, exit 1;
* anything else: one line saying it is a bug, exit 1.

``--debug`` (or ``RCFD_DEBUG=1``) shows the traceback instead. SIGTERM outside a training
step stops cleanly (exit 0, a message); during training the loop checkpoints first.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from typing import Callable, Sequence

from rcfd.io.checkpoint import load_diffusion_checkpoint
from rcfd.cli import STOPPED
from rcfd.distributed import env_info
from rcfd.distributed import resolve_device as _resolve_device
from rcfd.errors import EnvironmentFailure, Interrupted, NonFiniteLossError, UsageError
from rcfd.samplers import SAMPLERS

EXIT_USAGE, EXIT_FAILURE = 2, 1
_MACHINE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO}


def debugging(argv: Sequence[str] | None = None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return os.environ.get("RCFD_DEBUG") == "1" or "--debug" in args


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _stop_outside_training(signum, frame):
    raise Interrupted(STOPPED, None, 0)


def _describe_os_error(e: OSError) -> str:
    msg = e.strerror or str(e)
    if e.filename and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    return msg


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main`` and end it as the module docstring says."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop_outside_training)
    try:
        return main(argv)
    except Interrupted as e:  # a stage checkpointed and stopped, or SIGTERM during setup
        _say(str(e) if e.checkpoint is None else "stopped; continue with the same command and --resume")
        return 0
    except SystemExit as e:  # argparse's usage errors (2) and --help (0)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        _say("\ninterrupted: rerun with --resume to continue from the last checkpoint")
        return 130
    except Exception as e:  # noqa: BLE001 - every error ends in one line unless debugging
        if debugging(argv):
            raise
        return _report(e)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _report(e: Exception) -> int:
    """Print ``e`` as one line and return the exit code it deserves."""
    if isinstance(e, EnvironmentFailure):
        _say(f"error: {e}")
        return EXIT_FAILURE
    if isinstance(e, OSError) and e.errno in _MACHINE_ERRNOS:
        _say(f"error: {_describe_os_error(e)}")
        return EXIT_FAILURE
    if isinstance(e, NonFiniteLossError):
        _say(f"error: {e}")
        return EXIT_FAILURE
    if isinstance(e, OSError):  # a missing or unreadable input the user named
        _say(f"error: {_describe_os_error(e)}")
        return EXIT_USAGE
    if isinstance(e, (UsageError, ValueError, TypeError)):
        _say(f"error: {e}")
        return EXIT_USAGE
    _say(f"error: {type(e).__name__}: {e} (this is a bug in rcfd; rerun with --debug for the "
         "traceback and report it)")
    return EXIT_FAILURE


# --------------------------------------------------------------------------- shared options


def add_common_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--debug`` (every command)."""
    p.add_argument("--device", default=None,
                   help="auto (default: CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (also RCFD_DEBUG=1)")


def add_seed_arg(p: argparse.ArgumentParser, default: int | None) -> None:
    """``--seed``: the seed a command's random numbers derive from (the sampling noise; for
    training the config's seed). ``default=None`` keeps the config's."""
    shown = "the config's" if default is None else default
    p.add_argument("--seed", type=int, default=default, help=f"random seed (default: {shown})")


def add_sampler_arg(p: argparse.ArgumentParser) -> None:
    """``--sampler`` of the commands that sample a diffusion checkpoint."""
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default="ddim",
                   help="ddim (default), dpm-solver (DPM-Solver++(2M)) or pndm (PLMS)")


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    """``--no-progress``: no progress bars (for logs and pipes)."""
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """How the commands that sample a diffusion checkpoint load and run it (see
    :func:`load_model`)."""
    p.add_argument("--image-size", type=int, default=None,
                   help="image size of a reference-format checkpoint (default 32)")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights, not the EMA copy")
    p.add_argument("--no-cuda-graph", action="store_true", help="eager sampler on a GPU")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="the model's dtype while sampling (default auto: bf16 on CUDA, fp32 elsewhere)")


def load_model(args: argparse.Namespace, device):
    """``(model, info)`` of ``args.checkpoint`` as :func:`add_model_args` asks."""
    if args.image_size is not None and args.image_size < 1:
        raise UsageError(f"--image-size must be a positive integer, got {args.image_size}")
    return load_diffusion_checkpoint(args.checkpoint, device, use_ema=False if args.no_ema else None,
                                     image_size=args.image_size or 32)


def resolve_device(device: str | None):
    """The torch device for ``--device`` (``None``/``"auto"``: CUDA when available)."""
    try:
        return _resolve_device(device or "auto", env_info())
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {device}: {e}") from None


def positive(name: str, value: int | None) -> None:
    """A usage error unless ``value`` (an option's integer) is ``None`` or positive."""
    if value is not None and value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value}")
