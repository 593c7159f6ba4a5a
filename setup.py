"""Builds the extension ``rcfd._C`` (the fused DDIM update) with torch.utils.cpp_extension.

A CUDA extension is built whenever a CUDA toolkit (nvcc) and a CUDA build of torch are
present; no GPU is needed at build time. Otherwise a CPU-only extension is built.

Environment switches:
  RCFD_FORCE_CUDA=1      build the CUDA kernels or fail (e.g. on a build server)
  RCFD_NO_CUDA=1         build the CPU kernels only
  TORCH_CUDA_ARCH_LIST   target architectures, e.g. "8.0;9.0" (default: DEFAULT_ARCHS)
  CUDA_HOME              the toolkit; found from nvcc when unset
  DEBUG=1                -O0 -g (and -G for device code) instead of -O3
  MAX_JOBS               parallel compile jobs (ninja)

Install with ``pip install --no-build-isolation -e .`` after torch, so that the extension is
built against the torch it will run with.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# Ampere (A100, RTX 30xx), Ada (L4, RTX 40xx), Hopper (H100/H200), Blackwell (B200, RTX 50xx);
# PTX of the last one lets newer cards JIT-compile it.
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH if set, else the toolkit of the nvcc on PATH.

    nvcc may be a wrapper script outside the toolkit, so ask nvcc itself: its ``--dryrun``
    output names the toolkit's top folder.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path and Path(path, "bin").is_dir():
            return str(Path(path).resolve())
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=120,
            )
            m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
            if m and Path(m.group(1).strip(), "include").is_dir():
                return str(Path(m.group(1).strip()).resolve())
        except (OSError, subprocess.SubprocessError):
            pass
        top = Path(nvcc).resolve().parent.parent
        if (top / "include").is_dir():
            return str(top)
    for path in ("/usr/local/cuda", "/opt/cuda"):
        if Path(path, "bin", "nvcc").exists():
            return str(Path(path).resolve())
    return None


def cuda_library_dirs(cuda_home: str) -> list[str]:
    """Toolkits keep their libraries in lib64/ or lib/ (or under targets/<arch>/lib)."""
    home = Path(cuda_home)
    candidates = [home / "lib64", home / "lib", *sorted(home.glob("targets/*/lib"))]
    return [str(p) for p in candidates if (p / "libcudart.so").exists() or p.is_dir()]


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
cuda_home = None if env_flag("RCFD_NO_CUDA") else find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "rcfd builds a PyTorch extension: install torch first, then run\n"
        "    pip install --no-build-isolation -e .\n"
        "(--no-build-isolation builds against the torch you installed)."
    )


def use_cuda() -> bool:
    if env_flag("RCFD_NO_CUDA"):
        return False
    if env_flag("RCFD_FORCE_CUDA"):
        if cuda_home is None:
            sys.exit("RCFD_FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME or put nvcc on PATH")
        if torch.version.cuda is None:
            sys.exit(f"RCFD_FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build")
        return True
    return cuda_home is not None and torch.version.cuda is not None


def extensions():
    debug = env_flag("DEBUG")
    # -fno-trapping-math lets the compiler turn the clip's compares into vector min/max
    # (the kernels never rely on floating-point exceptions); -fopenmp makes at::parallel_for
    # (a header template) run on torch's OpenMP threads instead of serially.
    opt = (["-O0", "-g"] if debug else ["-O3", "-fno-trapping-math"]) + ["-fopenmp"]
    macros = [("RCFD_TORCH_VERSION", f'"{torch.__version__}"')]
    if debug:
        macros.append(("RCFD_DEBUG", "1"))
    sources = ["csrc/ddim_update.cpp", "csrc/ddim_update_autograd.cpp"]
    if not use_cuda():
        print(f"rcfd: building the CPU-only extension (torch {torch.__version__}, "
              f"CUDA toolkit: {cuda_home or 'not found'})")
        return [CppExtension("rcfd._C", sources, define_macros=macros,
                             extra_compile_args={"cxx": opt}, extra_link_args=["-fopenmp"])]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    print(f"rcfd: building the CUDA extension (torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"toolkit {cuda_home}, archs {archs})")
    macros += [("RCFD_WITH_CUDA", "1"), ("RCFD_CUDA_ARCHS", f'"{archs}"')]
    nvcc = (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + ["--threads=0"]
    return [
        CUDAExtension(
            "rcfd._C",
            sources + ["csrc/cuda/ddim_update.cu"],
            define_macros=macros,
            library_dirs=cuda_library_dirs(cuda_home),
            extra_compile_args={"cxx": opt, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
