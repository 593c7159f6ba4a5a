"""The feature-KL Triton kernels compiled for real GPUs, without one.

Triton's compiler and the ``ptxas`` it ships turn the kernels into sm_80 / sm_90 machine code
on any machine, so these tests catch what the interpreter lets through (a construct only it
accepts, a type the GPU compiler rejects) and launch settings that spill registers to local
memory, which would cost the bandwidth-bound kernel its speed. Register and stack use come
from ``cuobjdump``. The compilation runs in one subprocess without ``TRITON_INTERPRET``
(the interpreter patches ``triton.language`` in the process that uses it).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from rcfd.core.kernels import feature_kl as fk

triton = pytest.importorskip("triton", reason="needs triton (pip install triton: its Linux "
                                               "wheels ship the NVIDIA backend with ptxas and "
                                               "cuobjdump)")
pytestmark = pytest.mark.triton
# A triton with an NVIDIA backend ships ptxas and cuobjdump in triton/backends/nvidia/bin/:
# there, a missing tool is a broken install and fails the tests instead of skipping them.
NVIDIA_BACKEND = importlib.util.find_spec("triton.backends.nvidia") is not None
TOOLS = ("ptxas", "cuobjdump")  # ptxas for triton.compile, cuobjdump for the resource use
MAX_REGS = 255  # per thread, the hardware limit
TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SCALARS = {"n_rows", "n_cols", "s_stride", "t_stride", "scale_stride"}  # i32, the rest fp32

# The training shapes, the bandwidth-bound shape, the longest whole row, tiny rows; the
# persistent variant at the bandwidth-bound shape.
ROW_SHAPES = [(128, 512), (128, 1920), (128, 2048), (16384, 4096), (4, fk.MAX_ROW_BLOCK),
              (3, 7)]
ROW_CASES = [(shape, dtype, arch) for shape in ROW_SHAPES for dtype in ("float32", "bfloat16")
             for arch in (80, 90)]
PERSISTENT_CASES = [(dtype, stages) for dtype in ("float32", "bfloat16") for stages in (2, 3)]
ONLINE_CASES = [(dtype, write) for dtype in ("float32", "bfloat16", "float16")
                for write in (True, False)]
SCALE_CASES = ["float32", "bfloat16"]


def _specs() -> dict:
    """Every kernel build the tests check: ``id -> (kernel, constexprs, dtype, warps, arch)``."""
    specs = {}
    for shape, dtype, arch in ROW_CASES:
        cfg = fk.launch_config(*shape)
        specs[f"rows-{shape}-{dtype}-{arch}"] = (
            "_kl_rows_kernel", {"ROWS": cfg.rows, "BLOCK_D": cfg.block_d, "WRITE_GRAD": True,
                                "STAGES": 0}, dtype, cfg.num_warps, arch)
    cfg = fk.launch_config(16384, 4096)
    for dtype, stages in PERSISTENT_CASES:
        specs[f"persistent-{dtype}-{stages}"] = (
            "_kl_rows_kernel", {"ROWS": cfg.rows, "BLOCK_D": cfg.block_d, "WRITE_GRAD": True,
                                "STAGES": stages}, dtype, cfg.num_warps, 90)
    cfg = fk.launch_config(2, 65536)
    for dtype, write in ONLINE_CASES:
        specs[f"online-{dtype}-{write}"] = (
            "_kl_online_kernel", {"CHUNK": cfg.block_d, "WRITE_GRAD": write}, dtype,
            cfg.num_warps, 90)
    for dtype in SCALE_CASES:
        specs[f"scale-{dtype}"] = ("_scale_rows_kernel", {"BLOCK": fk.SCALE_BLOCK}, dtype,
                                   fk._warps(fk.SCALE_BLOCK), 90)
    return specs


def _compile(kernel_name, constexprs, dtype, num_warps, arch) -> dict:
    """(In the subprocess.) Compile one kernel for ``sm_<arch>``: its resource use and PTX."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    kernel = getattr(fk, kernel_name)
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in ("loss_ptr", "scale_ptr") else f"*{TYPES[dtype]}"
        else:
            signature[name] = "i32" if name in SCALARS else "fp32"
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    cubin = f"/dev/shm/rcfd-{os.getpid()}.cubin" if os.path.isdir("/dev/shm") else "kernel.cubin"
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", cubin],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(cubin)
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out)}
    return {"usage": usage, "ptx": compiled.asm["ptx"]}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Compile every spec in one subprocess without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path_factory.mktemp("codegen"))
    if proc.returncode == 3:
        missing = proc.stderr.strip()
        if NVIDIA_BACKEND:
            pytest.fail(f"triton {triton.__version__} has its NVIDIA backend but not the tools "
                        f"it ships ({missing}): reinstall it (pip install --force-reinstall "
                        f"triton=={triton.__version__}) or set TRITON_PTXAS_PATH and "
                        "TRITON_CUOBJDUMP_PATH to a CUDA toolkit's ptxas and cuobjdump")
        pytest.skip(f"this triton has no NVIDIA backend, so no offline ptxas / cuobjdump "
                    f"({missing}); install the Linux wheel from PyPI (pip install triton), "
                    "which ships them")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def assert_fits(build: dict):
    if "error" in build:
        pytest.fail(build["error"])
    usage = build["usage"]
    assert usage["REG"] <= MAX_REGS
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"register spills: {usage}"


@pytest.mark.parametrize("shape,dtype,arch", ROW_CASES, ids=str)
def test_rows_kernel_compiles_without_spills(builds, shape, dtype, arch):
    assert not fk.launch_config(*shape).online
    assert_fits(builds[f"rows-{shape}-{dtype}-{arch}"])


@pytest.mark.parametrize("dtype,stages", PERSISTENT_CASES, ids=str)
def test_persistent_rows_kernel_compiles_without_spills(builds, dtype, stages):
    """The persistent loop over row tiles at 16384 x 4096, loads pipelined 2 or 3 deep."""
    assert_fits(builds[f"persistent-{dtype}-{stages}"])


@pytest.mark.parametrize("dtype,write_grad", ONLINE_CASES, ids=str)
def test_online_kernel_compiles_without_spills(builds, dtype, write_grad):
    assert_fits(builds[f"online-{dtype}-{write_grad}"])


@pytest.mark.parametrize("dtype", SCALE_CASES)
def test_scale_kernel_compiles_with_its_branch(builds, dtype):
    """The skip-if-one test on a loaded scalar is legal for the GPU compiler, not only the
    interpreter, and becomes a real branch around the loads and stores."""
    build = builds[f"scale-{dtype}"]
    assert_fits(build)
    assert re.search(r"@!?%p\d+ bra", build["ptx"]), "the scale == 1 test is not a branch"


if __name__ == "__main__":  # the subprocess of the ``builds`` fixture
    try:
        import triton.backends.compiler  # noqa: F401
        from triton import knobs

        for tool in TOOLS:
            getattr(knobs.nvidia, tool).path  # noqa: B018  (RuntimeError when it is missing)
    except (ImportError, AttributeError, RuntimeError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(3)
    results = {}
    for key, spec in _specs().items():
        try:
            results[key] = _compile(*spec)
        except Exception as exc:  # reported by the test of this build
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results))
