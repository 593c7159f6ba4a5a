"""The README's "Python API" example runs as written: its first ```python block after the
heading, executed in a fresh interpreter in a temporary folder that holds the checkpoint it
names (a random PD-student-shaped 8 px digits U-Net, T=1 on 64 indices)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcfd.core.unet import UNet, UNetConfig
from rcfd.io.checkpoint import save_diffusion_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Python API"


def readme_block(text: str, heading: str = HEADING) -> str:
    """The first ```python block after ``heading`` (a line of its own) in ``text``."""
    start = re.search(rf"^{re.escape(heading)}\s*$", text, flags=re.M)
    if start is None:
        raise LookupError(f"no {heading!r} heading")
    block = re.search(r"^```python\n(.*?)^```", text[start.end():], flags=re.M | re.S)
    if block is None:
        raise LookupError(f"no ```python block after {heading!r}")
    return block.group(1)


def test_readme_block_is_found_only_after_the_heading():
    text = "```python\nwrong\n```\n## Python API\nwords\n```python\nright = 1\n```\n```python\nlater\n```\n"
    assert readme_block(text) == "right = 1\n"
    with pytest.raises(LookupError):
        readme_block("## Python APIs\n```python\nx\n```\n")


def test_the_readme_python_example_runs(tmp_path):
    code = readme_block((ROOT / "README.md").read_text(encoding="utf-8"))
    path = re.search(r'rcfd\.load\("([^"]+)"\)', code).group(1)
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=1, image_size=8, ch=32, ch_mult=(1, 2), attn=(), num_res_blocks=1,
                          dropout=0.0, num_time_indices=65))
    (tmp_path / path).parent.mkdir(parents=True)
    save_diffusion_checkpoint(tmp_path / path, net, T=1, time_scale=64)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    fid = float(out.stdout.strip().splitlines()[-1])  # the example prints the pixel FID
    assert fid > 0
