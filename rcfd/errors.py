"""Every error the package raises on purpose, in one place, by what the user should do.

* :class:`UsageError` and its kinds: the user asked for something that cannot be done
  (arguments, configuration, files, the state of a run directory). The command lines print
  them as one line ``error: ...`` and exit with code 2.
* :class:`EnvironmentFailure`: the machine refused (a read-only directory, a full disk).
  Printed as one line naming the path; exit code 1.
* :class:`NonFiniteLossError`: training diverged; exit code 1.
* :class:`Interrupted`: training stopped on request after writing a resumable checkpoint
  (a ``SystemExit`` with code 0).

A traceback is shown only with ``--debug`` or ``RCFD_DEBUG=1``.
"""

from __future__ import annotations

from pathlib import Path


class UsageError(ValueError):
    """A mistake in what was asked: reported in one line, exit code 2. (A ``ValueError``:
    an argument, a file or a value the user gave cannot be used as it is.)"""


class ConfigError(UsageError):
    """An invalid configuration value or key; the message names the dotted key."""


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint file is missing pieces, damaged, or not of a format we read."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that could only be loaded by running arbitrary pickled code."""


class StateDictMismatchError(UsageError, RuntimeError):
    """A state dict does not fit the model it is loaded into."""


class DataError(UsageError):
    """Data that cannot be read as asked (a missing path, a corrupt file, too few images)."""


class StageExistsError(UsageError, RuntimeError):
    """The run directory already holds this stage (finished or in progress)."""


class ResumeError(UsageError):
    """A training state cannot be resumed as asked (another config, data, world size or
    thread count); the message names what changed."""


class EnvironmentFailure(OSError):
    """The machine refused a write (permissions, a full disk); the message names the path."""

    def __init__(self, path: str | Path, cause: BaseException):
        self.path = Path(path)
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        super().__init__(getattr(cause, "errno", None), f"cannot write {self.path}: {reason}")

    def __str__(self) -> str:
        return self.args[1]


class NonFiniteLossError(RuntimeError):
    """A loss (or gradient norm) became NaN or infinite."""


class Interrupted(SystemExit):
    """Training stopped on request (SIGINT/SIGTERM or a step budget) after writing a
    resumable checkpoint; exits the process with code 0 when not caught."""

    def __init__(self, message: str, checkpoint: Path | None, step: int):
        super().__init__(0)
        self.message, self.checkpoint, self.step = message, checkpoint, step

    def __str__(self) -> str:
        return self.message
