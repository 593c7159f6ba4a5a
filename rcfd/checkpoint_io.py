"""Checkpoint files on disk: the atomic save and the safe load (the formats inside them are
:mod:`rcfd.checkpoint`'s).

**Loading.** Every file is read with ``torch.load(weights_only=True)``: tensors, dicts, lists,
tuples, str, int, float, bool and None only. A file that needs pickled code to load is
refused and never executed, and no error message repeats torch's advice to switch that
protection off. Before torch reads a zip-format file its members are checked: their CRCs
(flipped bytes) and their sizes (torch allocates each member's declared size, so a small
compressed or crafted archive could otherwise ask for gigabytes).

**Saving.** A checkpoint is written to a temporary file in the same directory,
``.<name>.pid<pid>.<random>.tmp``, flushed and fsynced, then ``os.replace``-d over the target
and the directory fsynced: a crash or ``kill -9`` at any moment leaves the old file or the
new one, never a torn one. A write the machine refuses (a read-only directory, a full disk)
removes its temporary file, leaves any previous checkpoint untouched and raises
:class:`~rcfd.errors.EnvironmentFailure` (an ``OSError``) naming the checkpoint.

**Stale temporary files.** A killed writer leaves its temporary file behind. After each
successful save of ``path``, the temporary files of that same name (``.<name>.pid<pid>.
<random>.tmp``, and ``.<name>.<random>.tmp`` from older versions) are deleted when both
(a) they were last modified before this save's own temporary file was created, so a writer
that started later is never touched, and (b) the process that made them is not running on
this machine (checked by pid; the older names carry none). A writer on another machine
sharing the directory is judged by (a) alone: one stalled for longer than a whole save
of this writer may lose its temporary file, and its save then fails with an error instead
of replacing the newer checkpoint.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch

from rcfd.errors import CheckpointError, EnvironmentFailure, UnsafeCheckpointError

_PLAIN_LEAVES = (torch.Tensor, str, int, float, bool, type(None))
_ZIP_SLACK = 1 << 20  # bytes a zip's members may expand beyond twice the file's size
_TEMP_RANDOM = r"[a-z0-9_]{8}"  # what tempfile.mkstemp puts between prefix and suffix


# ----------------------------------------------------------------------------- save
def check_weights_only(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` naming the first value that ``torch.load(weights_only=True)``
    would refuse (so we never write a file we will not read back)."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be a str or int, got {type(k).__name__}")
            check_weights_only(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_weights_only(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_LEAVES):
        raise TypeError(
            f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a safe "
            "(weights_only) load refuses; store tensors, dicts, lists, str, int, float, bool "
            "or None (e.g. torch.from_numpy(array), or a config's to_dict())"
        )


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` atomically (see the module docstring), then delete
    stale temporary files of ``path``. Raises ``FileNotFoundError`` when the directory does
    not exist, ``TypeError`` for a value a safe load would refuse (before touching any
    file) and :class:`~rcfd.errors.EnvironmentFailure` when the machine refuses the write."""
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot save checkpoint {path}: directory {directory} "
                                "does not exist (create it first)")
    check_weights_only(obj)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp",
                                   dir=directory)
    except OSError as e:
        raise EnvironmentFailure(path, e) from e
    try:
        born = os.fstat(fd).st_mtime_ns
        os.fchmod(fd, 0o666 & ~_umask())  # as an ordinary open() would create it
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        refused = _os_error(e)
        if refused is not None:
            raise EnvironmentFailure(path, refused) from e
        raise
    _fsync_directory(directory)
    remove_stale_temp_files(path, older_than_ns=born)
    return path


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
    """The names of :func:`save_checkpoint`'s temporary files for ``path`` (group 1: the
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


# ----------------------------------------------------------------------------- load
def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *,
                    verify: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors, each naming ``path``, for
    a missing, unreadable, empty, truncated, corrupt, oversized or unsafe file. ``verify``
    checks the CRC of every member of a zip-format checkpoint first (one extra read), which
    catches flipped bytes that ``torch.load`` would load silently."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file (a pipe or a device?)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was never written "
                              "completely; use an earlier checkpoint")
    if magic == b"PK\x03\x04":
        _check_zip(path, size, verify)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL\s+([\w.]+)", str(e)) or _foreign_globals(path)
        if found:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it pickles {', '.join(found[:3])}, and loading it "
                "would run that code, which could do anything; rcfd loads only tensors and "
                "plain values and never runs code from a file. Use a checkpoint written by "
                "rcfd. If you made this file yourself and trust it, keep only its tensors and "
                "plain values (numpy arrays -> torch.from_numpy) and save those with "
                "rcfd.checkpoint.save_checkpoint."
            ) from None
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (unreadable pickle: {torch_reason(e)})") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError,
            AttributeError, MemoryError) as e:
        raise CheckpointError(f"could not load checkpoint {path}: it is truncated, corrupt, "
                              f"or not a torch.save file ({torch_reason(e)})") from None


def torch_reason(e: BaseException) -> str:
    """``"Type: what failed"`` from a torch load error, without torch's advice on how to
    load the file anyway (which would run any code in it) and without terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    m = re.search(r"WeightsUnpickler error:\s*(.*)", text)
    line = m.group(1) if m else (text.splitlines() or [""])[0]
    line = re.split(r"\.?\s*(?:Please use|Re-running|To load|Do it only|if you trust)", line)[0]
    if re.search(r"weights_only|trust", line, re.IGNORECASE) or not line.strip():
        return type(e).__name__
    return f"{type(e).__name__}: {line.strip()}"


def _foreign_globals(path: Path, limit: int = 3) -> list[str]:
    """Names of non-torch code objects a pickle imports, read with ``pickletools`` (which
    parses the opcodes and executes nothing). Used to explain a refused load when
    ``torch.load`` stopped before reaching them."""
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
                data = z.read(pkl)  # its size was bounded by _check_zip
        else:
            data = path.read_bytes()
        stream, strings = io.BytesIO(data), []
        for _ in range(4):  # the legacy format is a few pickles in a row
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - garbage after the pickles, or no pickle at all
        pass
    safe = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset")
    return list(dict.fromkeys(n for n in found if not n.startswith(safe)))[:limit]


def _check_zip(path: Path, size: int, verify: bool) -> None:
    """Refuse a zip whose members expand far beyond the file (torch.save stores them
    uncompressed, and torch allocates each member's declared size), then check CRCs."""
    try:
        with zipfile.ZipFile(path) as z:
            expanded = sum(i.file_size for i in z.infolist())
            if expanded > 2 * size + _ZIP_SLACK:
                raise CheckpointError(
                    f"checkpoint {path} is a {size}-byte archive whose members expand to "
                    f"{expanded} bytes; torch.save stores them uncompressed, so it is crafted "
                    "or re-compressed: refused (re-save it with torch.save)")
            bad = z.testzip() if verify else None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError,
            OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a complete "
                              f"zip archive: {e}); use an earlier checkpoint") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: member {bad!r} fails its CRC "
                              "check (damaged on disk or in transfer); use another copy")
