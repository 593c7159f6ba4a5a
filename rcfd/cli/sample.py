"""Images from any diffusion checkpoint (ours or a reference-format one) with an N-step sampler
(DDIM, DPM-Solver++(2M) or PNDM), written as a PNG grid or an ``.npz``.

    python -m rcfd.sample runs/digits/rcfd/T1.safetensors --steps 1 --num 64 --out grid.png
    python -m rcfd.sample runs/digits/base/model.safetensors --steps 8 --num 10000 \\
        --batch-size 500 --out samples.npz
    python -m rcfd.sample runs/digits/base/model.safetensors --steps 8 --sampler dpm-solver \\
        --out dpm8.png

A run writes its checkpoints as ``runs/<name>/<stage>/<unit>.safetensors``
(``base/model.safetensors``, ``pd/T4.safetensors``, ``rcfd/T1.safetensors``, ...; an earlier
version's ``.pt`` checkpoints load as well). The ``.npz`` holds ``arr_0``: uint8
``[N, H, W, C]`` (the layout common evaluation scripts read), and ``steps``, ``seed``, ``T``,
``time_scale``. The noise is drawn on the sampling device per image (in fixed chunks of 64
images, each from its own generator seeded from ``--seed`` and the chunk's index), so image
``i`` of a seed is the same on every run on one kind of device whatever ``--batch-size`` and
``--num`` (CPU and CUDA generators draw different numbers); on a GPU the steps run as one
captured CUDA graph per batch shape (``--no-cuda-graph`` for the eager loop).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rcfd.io.files import atomic_write
from rcfd.cli.common import (add_common_args, add_model_args, add_progress_arg, add_sampler_arg,
                             add_seed_arg, load_model, positive, resolve_device, run_cli)
from rcfd.core.schedule import describe_schedule
from rcfd.errors import UsageError
from rcfd.evaluation.measure import sample_images
from rcfd.io.grids import display_scale, save_grid

OUTPUT_SUFFIXES = (".png", ".npz")


def save_npz(images: torch.Tensor, path: str | os.PathLike, **meta) -> Path:
    """Write uint8 images ``[N, C, H, W]`` as ``arr_0`` ``[N, H, W, C]`` plus ``meta``
    scalars, atomically."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    arrays = {"arr_0": images.permute(0, 2, 3, 1).contiguous().numpy(),
              **{k: np.asarray(v) for k, v in meta.items()}}
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def save_samples(images: torch.Tensor, path: str | os.PathLike, *, nrow: int | None = None,
                 scale: int | None = None, **meta) -> Path:
    """Write uint8 images as a PNG grid or an ``.npz``, chosen by ``path``'s suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return save_npz(images, path, **meta)
    if suffix == ".png":
        scale = display_scale(images.shape[-1]) if scale is None else scale
        return save_grid(images, path, nrow=nrow, scale=scale)
    raise UsageError(f"--out must end in .png (a grid) or .npz (the images), got {path}")


def add_sampling_args(p: argparse.ArgumentParser, num_default: int | None) -> None:
    """``--steps``, ``--sampler``, ``--num``, ``--seed`` and ``--batch-size``: what to draw
    (shared with ``python -m rcfd.export --to npz``, so the same flags give the same images)."""
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's T)")
    add_sampler_arg(p)
    shown = "required" if num_default is None else f"default {num_default}"
    p.add_argument("--num", type=int, default=num_default, help=f"number of images ({shown})")
    add_seed_arg(p, default=0)
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per sampler call (memory only: the images do not depend on it)")


def checked_steps(info, steps: int | None) -> int:
    """``--steps`` (``None``: the checkpoint's ``T``), refused unless it divides ``T``."""
    steps = info.T if steps is None else steps
    if steps > info.T or info.T % steps:
        raise UsageError(f"--steps {steps} must divide the checkpoint's T={info.T} (try a power of two <= {info.T})")
    return steps


def draw(args: argparse.Namespace, model, info, steps: int, device) -> torch.Tensor:
    """The uint8 ``[N, C, H, W]`` images :func:`add_sampling_args` and
    :func:`~rcfd.cli.common.add_model_args` ask for (:func:`rcfd.evaluation.measure.sample_images`)."""
    return sample_images(model, info, num_samples=args.num, num_steps=steps, batch_size=args.batch_size,
                         sampler=args.sampler, dtype=args.dtype, device=device, seed=args.seed,
                         use_cuda_graph=not args.no_cuda_graph, progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rcfd.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="diffusion checkpoint (rcfd or reference format)")
    add_sampling_args(p, num_default=64)
    p.add_argument("--out", default=None, help="output .png grid or .npz (default: "
                   "<checkpoint name>_samples_<steps>steps.png next to the checkpoint)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: a square)")
    p.add_argument("--scale", type=int, default=None, help="enlarge grid images this many times "
                   "(default: to at least 32 px)")
    add_model_args(p)
    add_progress_arg(p)
    add_common_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("num", "batch_size", "steps", "nrow", "scale"):
        positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.out is not None and Path(args.out).suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out must end in .png (a grid) or .npz (the images), got {args.out}")
    device = resolve_device(args.device)
    model, info = load_model(args, device)
    steps = checked_steps(info, args.steps)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(
        f"{Path(args.checkpoint).stem}_samples_{steps}steps.png")
    print(f"{args.checkpoint}: T={info.T}, time_scale={info.time_scale}, {info.source} format ({info.weights}), "
          f"prediction {info.prediction}, schedule {describe_schedule(info.noise_schedule)}; "
          f"{args.num} images, {steps}-step {args.sampler}, seed {args.seed}, on {device}", flush=True)
    images = draw(args, model, info, steps, device)
    path = save_samples(images, out, nrow=args.nrow, scale=args.scale, steps=steps, seed=args.seed,
                        T=info.T, time_scale=info.time_scale, sampler=args.sampler)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
