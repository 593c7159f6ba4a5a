"""A diffusion checkpoint out of rcfd: a diffusers model folder, or an ``.npz`` of samples for
the TF/OpenAI FID evaluators.

    python -m rcfd.export runs/digits/rcfd/T1.safetensors --to diffusers students/rcfd-T1
    python -m rcfd.export runs/cifar10/pd/T4.safetensors --to npz samples.npz --num 50000 \\
        --batch-size 500
    python -m rcfd.export runs/digits/pd/T1.safetensors --to npz digits.npz --num 10000 --rgb

``--to diffusers DIR`` writes ``unet/`` (``UNet2DModel``, safetensors weights), ``scheduler/``
(a ``DDIMScheduler`` that samples in the student's own steps) and ``model_index.json``
(:func:`rcfd.interop.diffusers_export.export_diffusers`); ``DIR`` must be new or empty. The
weights are written by rcfd's own safetensors writer; diffusers (``pip install
"rcfd[diffusers]"``) is needed only to load the folder.

``--to npz FILE --num N`` writes ``arr_0``: uint8 ``[N, H, W, C]``, the images
``python -m rcfd.sample --out FILE.npz`` writes for the same ``--num``, ``--seed``,
``--batch-size``, ``--steps`` and ``--sampler`` (plus the scalars ``steps``, ``seed``, ``T``,
``time_scale``, ``sampler``). One-channel models keep ``C = 1``; ``--rgb`` repeats the channel
to ``C = 3``, as the TF/OpenAI evaluators (Inception on RGB) need. ``FILE`` is replaced
atomically if it exists, as ``rcfd.sample`` replaces its ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from rcfd.api.model import schedule_of
from rcfd.cli.common import (add_common_args, add_model_args, add_progress_arg, load_model, positive,
                             resolve_device, run_cli)
from rcfd.cli.sample import add_sampling_args, checked_steps, draw, save_npz
from rcfd.errors import UsageError
from rcfd.interop.diffusers_export import export_diffusers

TARGETS = ("diffusers", "npz")
NPZ_ONLY = ("num", "steps", "rgb")  # options that mean nothing for a diffusers folder


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m rcfd.export`` parser (module docstring)."""
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m rcfd.export", description=doc[0],
                                epilog="examples:\n" + doc[1] + "\n\n" + "\n\n".join(doc[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="diffusion checkpoint (rcfd or reference format)")
    p.add_argument("output", help="the folder (--to diffusers) or the .npz file (--to npz) to write")
    p.add_argument("--to", choices=TARGETS, required=True,
                   help="diffusers (a UNet2DModel + DDIMScheduler folder) or npz (uint8 NHWC samples)")
    add_sampling_args(p, num_default=None)
    p.add_argument("--rgb", action="store_true",
                   help="--to npz: repeat a one-channel model's images to 3 channels (default: keep C=1)")
    add_model_args(p)
    add_progress_arg(p)
    add_common_args(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse what ``--to`` cannot use, before anything is loaded."""
    for name in ("num", "batch_size", "steps"):
        positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.to == "diffusers":
        given = [f"--{n}" for n in NPZ_ONLY if getattr(args, n) not in (None, False)]
        if given:
            raise UsageError(f"{', '.join(given)} apply to --to npz only: a diffusers folder holds "
                             "the model, not samples")
        return
    if args.num is None:
        raise UsageError("--to npz needs --num N (the number of images to write)")
    if Path(args.output).suffix.lower() != ".npz":
        raise UsageError(f"--to npz writes a .npz file, got {args.output}")


def evaluator_layout(images: torch.Tensor, rgb: bool) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` images as written: ``C = 1`` repeated to 3 when ``rgb``."""
    return images.expand(-1, 3, -1, -1) if rgb and images.shape[1] == 1 else images


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rcfd.export``: exit 0, or 2 with one ``error: ...`` line (nothing written)."""
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    device = resolve_device("cpu" if args.to == "diffusers" and args.device is None else args.device)
    model, info = load_model(args, device)
    print(f"{args.checkpoint}: T={info.T}, time_scale={info.time_scale}, {info.source} format "
          f"({info.weights}); to {args.to} {args.output}", flush=True)
    if args.to == "diffusers":
        path = export_diffusers(model, info, args.output, schedule=schedule_of(info))
    else:
        steps = checked_steps(info, args.steps)
        images = evaluator_layout(draw(args, model, info, steps, device), args.rgb)
        path = save_npz(images, args.output, steps=steps, seed=args.seed, T=info.T,
                        time_scale=info.time_scale, sampler=args.sampler)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
