"""Atomic files: the one helper every file of a run directory (checkpoints, configs, results,
plots, sample arrays) is written through, and the readers that report a torn file by name.

A write goes to a temporary file in the same directory, ``.<name>.pid<pid>.<random>.tmp``,
is flushed and fsynced, then ``os.replace``-d over the target, and the directory is fsynced:
a crash or ``kill -9`` at any moment leaves the old file or the new one, never a torn one. A
write the machine refuses (a read-only directory, a full disk) removes its temporary file,
leaves the previous file untouched and raises :class:`~rcfd.errors.EnvironmentFailure` (an
``OSError``) naming the path.

**Stale temporary files.** A killed writer leaves its temporary file behind. After each
successful write of ``path``, the temporary files of that same name (and the older
``.<name>.<random>.tmp`` form) are deleted when both (a) they were last modified before this
write's own temporary file was created, so a writer that started later is never touched, and
(b) the process that made them is not running on this machine (checked by pid; the older
names carry none). A writer on another machine sharing the directory is judged by (a) alone:
one stalled for longer than a whole write of this one may lose its temporary file, and its
write then fails with an error instead of replacing the newer file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from rcfd.errors import DataError, EnvironmentFailure

_MAX_JSON_DEPTH = 32  # a record nested deeper than this is a damaged file, not data

_TEMP_RANDOM = r"[a-z0-9_]{8}"  # what tempfile.mkstemp puts between prefix and suffix


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *,
                 create_parents: bool = True) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then rename it over
    ``path`` (see the module docstring). ``create_parents``: make missing directories
    (otherwise a missing one is a ``FileNotFoundError``)."""
    path = Path(path)
    try:
        if create_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.parent.is_dir():
            raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not "
                                    "exist (create it first)")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp",
                                   dir=path.parent)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise EnvironmentFailure(path, e) from e
    try:
        born = os.fstat(fd).st_mtime_ns
        os.fchmod(fd, 0o666 & ~_umask())  # as an ordinary open() would create it
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        refused = _os_error(e)
        if refused is not None:
            raise EnvironmentFailure(path, refused) from e
        raise
    _fsync_directory(path.parent)
    remove_stale_temp_files(path, older_than_ns=born)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """The JSON in ``path``; a file that is not valid JSON (e.g. torn by a killed plain
    write of an older version) is a :class:`~rcfd.errors.DataError` naming it and saying
    what to do."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} ({what}) is not valid JSON ({e}); it was probably torn by an "
                        f"interrupted write. Delete it (or restore it from a copy) and run again"
                        ) from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records (JSON objects) of a JSON-lines log such as a unit's metrics. A torn last
    line (a process killed while appending) is skipped; any other line that is not JSON is
    a :class:`~rcfd.errors.DataError` naming the file and the line. Blank lines and
    non-object values are skipped."""
    records, lines = [], Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}: line {i + 1} is not JSON ({e}); the log is damaged "
                            "(delete it to start the log afresh)") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def json_problem(v: Any, where: str = "", depth: int = 0) -> str | None:
    """What keeps ``v`` from being plain JSON data (``str``, ``int``, ``float``, ``bool``,
    ``None``, lists or tuples of them, dicts with ``str`` keys), or ``None`` when nothing
    does. Says where (``['path']``, ``[2]``) the first offending value sits."""
    if v is None or isinstance(v, (str, bool, int, float)):
        return None
    if depth >= _MAX_JSON_DEPTH:
        return f"nested deeper than {_MAX_JSON_DEPTH} levels at {where or 'the top'}"
    if isinstance(v, Mapping):
        items = list(v.items())
        bad_keys = [k for k, _ in items if not isinstance(k, str)]
        if bad_keys:
            return f"key {short_repr(bad_keys[0])}{where and ' in ' + where} is not a string"
    elif isinstance(v, (list, tuple)):
        items = list(enumerate(v))
    else:
        return f"{short_repr(v)}{where and ' at ' + where} is not a plain JSON value"
    problems = (json_problem(x, f"{where}[{k!r}]", depth + 1) for k, x in items)
    return next((p for p in problems if p is not None), None)


def short_repr(v: Any, limit: int = 60) -> str:
    """``repr(v)`` cut to ``limit`` characters (a tensor as its shape), for error messages
    about values read from a file, which may be huge."""
    text = repr(v) if not isinstance(v, torch.Tensor) else f"a tensor {tuple(v.shape)}"
    return text if len(text) <= limit else text[:limit] + "..."


def _os_error(e: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write: ``e`` itself, or the one torch's zip writer
    hides behind the ``RuntimeError`` it raises while closing a half-written archive (what
    a full disk looks like from ``torch.save``)."""
    if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: not the machine's doing
        return None
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, EnvironmentFailure):
            return None
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def temp_file_pattern(path: str | os.PathLike) -> re.Pattern:
    """The names of :func:`atomic_write`'s temporary files for ``path`` (group 1: the
    writer's pid, ``None`` in the older ``.<name>.<random>.tmp`` form)."""
    return re.compile(rf"\.{re.escape(Path(path).name)}\.(?:pid(\d+)\.)?{_TEMP_RANDOM}\.tmp")


def remove_stale_temp_files(path: str | os.PathLike, older_than_ns: int) -> list[Path]:
    """Delete the temporary files of ``path`` left by killed writers: modified before
    ``older_than_ns`` (``st_mtime_ns``) and made by no process running here (module
    docstring). Returns what was deleted; files that vanish or resist are left alone."""
    path = Path(path)
    pattern, removed = temp_file_pattern(path), []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or (m.group(1) is not None and _process_alive(int(m.group(1)))):
            continue
        candidate = path.parent / name
        try:
            if candidate.lstat().st_mtime_ns < older_than_ns:
                candidate.unlink()
                removed.append(candidate)
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a pid we cannot ask about): keep its file
    return True


def _umask() -> int:
    try:  # Linux: read it without the racy set-and-restore dance
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
