"""Importing the package loads nothing heavy and changes nothing process-wide (DESIGN.md:
"Importing a module defines names and nothing else"): no Triton, no torch-fidelity, no
compiled extension until an op is first used, the cuDNN flags and Dynamo's cache as the
user left them. Each check runs in a fresh interpreter, so what this test process already
imported does not hide an import."""

import json
import subprocess
import sys

import pytest

HEAVY = ("triton", "torch_fidelity", "rcfd._C", "rcfd.core.kernels.feature_kl")
LIGHT = ("rcfd", "rcfd.samplers", "rcfd.losses", "rcfd.core.ops", "rcfd.io", "rcfd.report",
         "rcfd.training.fast_step")
ALL = LIGHT + ("rcfd.methods", "rcfd.training.loop", "rcfd.study.pipeline", "rcfd.evaluation",
               "rcfd.cli.train")


def child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def heavy_imports(names: tuple) -> list[str]:
    """The modules of :data:`HEAVY` (or under them) that importing ``names`` imports."""
    got = child(
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n")
    assert set(names) <= set(got)  # the imports happened
    return [m for m in got if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def test_importing_the_package_imports_no_triton_fidelity_or_extension():
    assert heavy_imports(LIGHT) == []


def test_no_module_imports_the_extension_or_our_triton_kernels():
    assert [m for m in heavy_imports(ALL) if m.startswith("rcfd.")] == []


@pytest.mark.xfail(strict=True, reason="rcfd.evaluation.fidelity imports torch_fidelity (and "
                   "through it torchvision, torch._dynamo and Triton) at import")
def test_importing_the_methods_and_the_pipeline_imports_no_triton_or_fidelity():
    assert heavy_imports(ALL) == []


def test_importing_every_module_keeps_process_wide_state():
    """A user's compiled function, compiled before the import, is still cached after it
    (no Dynamo reset: calling it again compiles nothing), and the cuDNN flags are as set."""
    got = child(
        "import importlib, json, pkgutil, torch\n"
        "from torch._dynamo.testing import CompileCounter\n"
        "torch.backends.cudnn.benchmark = False\n"
        "counter = CompileCounter()\n"
        "f = torch.compile(lambda x: x * 2 + 1, backend=counter)\n"
        "f(torch.ones(3))\n"
        "before = counter.frame_count\n"
        "import rcfd\n"
        "names = [m.name for m in pkgutil.walk_packages(rcfd.__path__, 'rcfd.')\n"
        "         if m.name != 'rcfd._C']\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "f(torch.ones(3))\n"
        "print(json.dumps({'names': names, 'before': before, 'after': counter.frame_count,\n"
        "                  'benchmark': torch.backends.cudnn.benchmark,\n"
        "                  'deterministic': torch.backends.cudnn.deterministic}))\n")
    assert len(got["names"]) > 50 and "rcfd.training.fast_step" in got["names"]
    assert got["before"] == 1 and got["after"] == 1
    assert got["benchmark"] is False and got["deterministic"] is False


def test_ops_load_the_extension_and_triton_on_first_use():
    got = child(
        "import json, sys, torch\n"
        "from rcfd.core import ops\n"
        "seen = {'import': 'rcfd._C' in sys.modules}\n"
        "z = torch.randn(2, 3)\n"
        "out = ops.ddim_update(z, z, 0.9, 0.4, 0.8, 0.6)\n"
        "seen['ddim'] = 'rcfd._C' in sys.modules\n"
        "seen['triton_after_ddim'] = 'triton' in sys.modules\n"
        "seen['route'] = ops.route('ddim_update', 'cpu')\n"
        "ops.backend('feature_kl', 'cpu')\n"
        "seen['triton_after_kl'] = 'triton' in sys.modules\n"
        "print(json.dumps(seen))\n")
    assert got == {"import": False, "ddim": True, "triton_after_ddim": False,
                   "route": "extension", "triton_after_kl": True}


def test_the_public_api_loads_without_triton_fidelity_or_extension():
    """``rcfd.load`` and ``rcfd.Model`` (attribute access: the lazy import) bring in the loader
    and the samplers, not Triton, torch-fidelity or the compiled extension."""
    got = child(
        "import json, sys\n"
        "import rcfd\n"
        "before = sorted(sys.modules)\n"
        "rcfd.load, rcfd.Model\n"
        "print(json.dumps({'before': 'rcfd.api.model' in before, 'after': sorted(sys.modules)}))\n")
    assert got["before"] is False and "rcfd.api.model" in got["after"]  # the access imported it
    assert [m for m in got["after"] if any(m == h or m.startswith(h + ".") for h in HEAVY)] == []
