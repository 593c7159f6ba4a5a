"""What a run says about where it ran: the header it prints first, and the platform record
kept with its results (commit, machine, threads, versions), so that a number can be traced to
the command, code and machine that produced it."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

from rcfd import __version__
from rcfd.core import ops


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str | None:
    """The git commit of the package's source tree (with ``+dirty`` when it has uncommitted
    changes), or ``None`` outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "rcfd"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def device_line(device: torch.device, dist) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        what = f"{device} {p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        what = f"cpu {cpu_name()}"
    world = f", {dist.world_size} processes ({dist.backend})" if dist.enabled else ""
    return f"{what}, {torch.get_num_threads()} threads{world}"


def backend_line(device: torch.device) -> str:
    what = {"extension": "fused kernel of rcfd._C", "triton": "Triton kernel",
            "reference": "PyTorch reference"}
    parts = [f"{op} -> {(b := ops.backend(op, device))} ({what.get(b, b)})"
             for op in ("ddim_update", "feature_kl")]
    if not ops.extension_loaded():
        parts.append(f"(extension rcfd._C not loaded: {ops.extension_error()})")
    return ", ".join(parts)


def platform_record(device: torch.device) -> dict:
    """The facts stored with every results file."""
    name = (torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name())
    return {"rcfd": __version__, "commit": commit(), "torch": str(torch.__version__),
            "python": platform.python_version(), "device": str(device), "device_name": name,
            "threads": torch.get_num_threads(), "machine": platform.machine()}


def header(cfg, run_dir: Path, device: torch.device, dist, source: str) -> str:
    return "\n".join([
        f"rcfd {__version__} | torch {torch.__version__} | python {platform.python_version()}"
        f" | commit {commit() or 'unknown'}",
        f"device   {device_line(device, dist)}",
        f"backends {backend_line(device)}",
        f"config   {cfg.name} ({source}), seed {cfg.seed}, data {cfg.data.name}"
        f"{'' if cfg.data.path is None else ' at ' + cfg.data.path}",
        f"run dir  {run_dir}",
    ])
