"""The study from the command line: ``python -m rcfd.train [STAGE] [options]``.

With no arguments it runs the whole study on the embedded default (the ``digits`` preset):
every registered training method in order (the classifiers, the base model, PD rounds down
to one step, RCFD rounds 8 -> 4 -> 2 -> 1), then IS/FID of every sampler they produce, into
``runs/digits``.

    python -m rcfd.train                              # the whole study (digits)
    python -m rcfd.train --preset smoke --out /tmp/s  # a tiny end-to-end check
    python -m rcfd.train pd --out runs/digits         # one stage of a run (with its config.json)
    python -m rcfd.train --set base.steps=500 --set eval.num_samples=500 --dry-run
    python -m rcfd.train --seeds 3                    # runs/digits/seed0..2 + the paired study
    torchrun --nproc_per_node=8 -m rcfd.train --preset cifar10-paper

This module only translates flags into the config (``--device`` is ``device``, ``--seed`` is
``seed``, ``--threads`` is ``threads``, ``--set a.b=v`` any field) and calls
:mod:`rcfd.study.pipeline`; the resolved config is written to RUN_DIR/config.json.
On CUDA it turns ``torch.backends.cudnn.benchmark`` on for its process (cuDNN times its
convolution algorithms once per shape and keeps the fastest) and says so on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch
import yaml

from rcfd import distributed
from rcfd.study import pipeline
from rcfd.cli.common import add_common_args, add_progress_arg, add_seed_arg, positive, run_cli
from rcfd.config import ConfigError
from rcfd.errors import Interrupted, UsageError
from rcfd.methods import registry
from rcfd.study.config import load_config
from rcfd.study.presets import DEFAULT_PRESET, PRESET_CONFIGS, get_preset


def stages() -> list[str]:
    """The stage names: every registered method, then ``evaluate`` and ``all``."""
    return [m.name for m in registry.methods()] + ["evaluate", "all"]


def build_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {m.name:<11} {m.help}" for m in registry.methods())
    epilog = (__doc__.split("\n\n", 1)[1] + "\nStages (default: all, in this order):\n" + lines
              + "\n  evaluate    IS / FID / KID of every sampler the methods produced\n")
    p = argparse.ArgumentParser(prog="python -m rcfd.train", description=__doc__.split("\n\n")[0],
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", nargs="?", choices=stages(), default="all", metavar="STAGE",
                   help=f"what to run: {', '.join(stages())} (default: all); a later stage reads "
                        "the earlier ones' checkpoints from RUN_DIR")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=tuple(PRESET_CONFIGS), default=None,
                     help=f"named configuration (default: {DEFAULT_PRESET})")
    src.add_argument("--config", metavar="FILE", default=None,
                     help="configuration file (.json, .yaml); may name a preset to start from")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override a config field by its dotted path, e.g. --set base.steps=500 (repeatable)")
    p.add_argument("--out", metavar="RUN_DIR", default=None, help="run directory (default: runs/<config name>)")
    add_seed_arg(p, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores this process may use; recorded "
                        "with the results; fewer on a busy machine)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="multi-seed study: the pipeline once per seed (seed, seed+1, ...) in "
                        "RUN_DIR/seed<seed>, then the paired comparison in RUN_DIR/study.md")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config (and, on stderr, each stage's plan) and exit")
    p.add_argument("--resume", action="store_true",
                   help="continue unfinished stages from their last checkpoint; finished stages are kept")
    p.add_argument("--overwrite", action="store_true", help="retrain stages that are already finished")
    p.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip up to N optimizer steps with a NaN/inf loss or gradient (default 0: stop)")
    add_progress_arg(p)
    add_common_args(p)
    return p


def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}``: values stay text for the config to
    read (as YAML scalars, ``1e-4`` included)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set takes KEY=VALUE (e.g. --set base.steps=500), got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def resolve_config(args: argparse.Namespace):
    """``(config, source, run_dir)``: the study config the arguments describe, a few words
    saying where it came from, and the run directory.

    The config is ``--config FILE``, else ``--preset``, else the run directory's own
    ``config.json`` when a single stage (or ``--resume``) is asked of an existing run, else
    the default preset; then ``--device``/``--seed``/``--threads`` and every ``--set`` are
    applied as dotted overrides."""
    overrides: dict[str, object] = {}
    for key in ("device", "seed", "threads"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    overrides.update(parse_overrides(args.overrides))
    file = Path(args.config) if args.config else None
    preset = args.preset or DEFAULT_PRESET
    out = Path(args.out) if args.out else None
    if file is None and args.preset is None and (args.stage != "all" or args.resume):
        saved = (out or Path("runs") / preset) / "config.json"
        file = saved if saved.is_file() else None
    source = f"config file {file}" if file else f"preset {preset}"
    if overrides:
        source += f" + {len(overrides)} override{'s' if len(overrides) > 1 else ''}"
    try:
        if file is not None:
            cfg = load_config(file, overrides, PRESET_CONFIGS)
        else:
            cfg = get_preset(preset).with_overrides(overrides)
    except ConfigError as e:
        raise ConfigError(f"invalid configuration: {e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{file} is not valid YAML: {e}") from None
    return cfg, source, out or Path("runs") / cfg.name


def use_cudnn_benchmark(device: str) -> None:
    """On CUDA, ``torch.backends.cudnn.benchmark = True`` for this process, said in one
    line: the command's choice (the library never sets it)."""
    info = distributed.env_info()
    if distributed.resolve_device(device, info).type == "cuda":
        torch.backends.cudnn.benchmark = True
        if info.is_main:
            print("rcfd: cudnn.benchmark on (CUDA: cuDNN picks the fastest convolution per shape)",
                  file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.skip_nonfinite < 0:
        raise UsageError(f"--skip-nonfinite must be >= 0, got {args.skip_nonfinite}")
    positive("--seeds", args.seeds)
    positive("--threads", args.threads)
    if args.resume and args.overwrite:
        raise UsageError("--resume keeps finished stages and --overwrite retrains them: pick one")
    cfg, source, out = resolve_config(args)
    if args.dry_run:
        print(cfg.to_json())
        for stage, line in pipeline.stage_plan(cfg).items():  # what each stage (and teacher) resolved to
            print(f"{stage}: {line}", file=sys.stderr)
        return 0
    use_cudnn_benchmark(cfg.device)
    options = pipeline.RunOptions(resume=args.resume, overwrite=args.overwrite,
                                  skip_nonfinite=args.skip_nonfinite, progress=not args.no_progress)
    try:
        if args.seeds is not None:
            pipeline.run_study(cfg, out, num_seeds=args.seeds, stage=args.stage, options=options,
                               source=source)
        else:
            pipeline.run_pipeline(cfg, out, stage=args.stage, options=options, source=source)
    except Interrupted:  # under torchrun every rank stops at the same step: leave together
        distributed.cleanup()
        raise
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
