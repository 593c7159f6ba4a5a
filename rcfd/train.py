"""The study from the command line: ``python -m rcfd.train [STAGE] [options]``.

With no arguments it runs the whole study on the embedded default (the ``digits`` preset):
the distillation and evaluation classifiers, the base model, PD rounds down to one step, RCFD
rounds 8 -> 4 -> 2 -> 1, then IS/FID of every (method, steps) pair, into ``runs/digits``.

    python -m rcfd.train                              # the whole study (digits)
    python -m rcfd.train --preset smoke --out /tmp/s  # a tiny end-to-end check
    python -m rcfd.train pd --out runs/digits         # one stage of a run (with its config.json)
    python -m rcfd.train --set base.steps=500 --set eval.num_samples=500 --dry-run
    python -m rcfd.train --seeds 3                    # runs/digits/seed0..2 + mean ± std
    torchrun --nproc_per_node=8 -m rcfd.train --preset cifar10-paper

Stages: ``classifier`` (both classifiers), ``base``, ``pd``, ``rcfd``, ``evaluate``, ``all``.
The CLI only translates flags into the config (``--device`` is ``device``, ``--seed`` is
``seed``, ``--set a.b=v`` any field); the resolved config is written to RUN_DIR/config.json.
Expected errors (bad arguments, missing files, a finished stage) print one line and exit 2;
``RCFD_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

STAGES = ("classifier", "base", "pd", "rcfd", "evaluate", "all")
EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what was asked (arguments, paths, run directory state): reported in one
    line, without a traceback, with exit code 2."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the user asked for something that cannot be done", not a bug:
    shown as one line (missing files, unreadable checkpoints, a stage the run directory
    already holds)."""
    from rcfd.checkpoint import CheckpointError, StateDictMismatchError
    from rcfd.trainers.loop import ResumeError
    from rcfd.trainers.rundir import StageExistsError

    return (UsageError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            CheckpointError, StateDictMismatchError, StageExistsError, ResumeError)


def _failed_training() -> tuple[type[BaseException], ...]:
    from rcfd.trainers.loop import NonFiniteLossError

    return (NonFiniteLossError,)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI ``main``; expected errors print ``error: ...`` to stderr and return 2,
    Ctrl-C returns 130. ``RCFD_DEBUG=1`` re-raises everything."""
    try:
        return main(argv)
    except SystemExit as e:  # argparse's usage errors (2) and --help (0); an interrupted stage (0)
        if getattr(e, "checkpoint", None) is not None:  # rcfd.trainers.loop.Interrupted
            print("stopped; continue with the same command and --resume", file=sys.stderr, flush=True)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    except _failed_training() as e:  # a diverged run: its message says what to do
        if os.environ.get("RCFD_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except expected_errors() as e:
        if os.environ.get("RCFD_DEBUG") == "1":
            raise
        msg = str(e)
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return EXIT_USAGE


def add_common_device_args(p: argparse.ArgumentParser) -> None:
    """``--device`` (shared by every CLI of the package)."""
    p.add_argument("--device", default=None,
                   help="auto (default: CUDA when available), cpu, cuda or cuda:N")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--image-size``, ``--no-ema`` and ``--no-cuda-graph``: how the CLIs that sample a
    diffusion checkpoint load and run it (see :func:`load_model`)."""
    p.add_argument("--image-size", type=int, default=None,
                   help="image size of a reference-format checkpoint (default 32)")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights, not the EMA copy")
    p.add_argument("--no-cuda-graph", action="store_true", help="eager sampler on a GPU")


def load_model(args: argparse.Namespace, device):
    """``(model, info)`` of ``args.checkpoint`` as :func:`add_model_args` asks."""
    from rcfd.checkpoint import load_diffusion_checkpoint

    return load_diffusion_checkpoint(args.checkpoint, device, use_ema=False if args.no_ema else None,
                                     image_size=args.image_size or 32)


def resolve_device(device: str | None):
    """The torch device for ``--device`` (``None``/``"auto"``: CUDA when available)."""
    from rcfd.distributed import env_info
    from rcfd.distributed import resolve_device as _resolve

    try:
        return _resolve(device or "auto", env_info())
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {device}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    from rcfd.presets import DEFAULT_PRESET, PRESETS

    p = argparse.ArgumentParser(prog="python -m rcfd.train", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", nargs="?", choices=STAGES, default="all",
                   help="what to run (default: all); a later stage reads the earlier ones' "
                        "checkpoints from RUN_DIR")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=tuple(PRESETS), default=None,
                     help=f"named configuration (default: {DEFAULT_PRESET})")
    src.add_argument("--config", metavar="FILE", default=None,
                     help="configuration file (.json, .yaml); may name a preset to start from")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override a config field by its dotted path, e.g. --set base.steps=500 (repeatable)")
    p.add_argument("--out", metavar="RUN_DIR", default=None, help="run directory (default: runs/<config name>)")
    add_common_device_args(p)
    p.add_argument("--seed", type=int, default=None, help="the config's seed")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="multi-seed study: the pipeline once per seed (seed, seed+1, ...) in "
                        "RUN_DIR/seed<seed>, then mean and std over seeds in RUN_DIR/results.md")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", action="store_true",
                   help="continue unfinished stages from their last checkpoint; finished stages are kept")
    p.add_argument("--overwrite", action="store_true", help="retrain stages that are already finished")
    p.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip up to N optimizer steps with a NaN/inf loss or gradient (default 0: stop)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines instead)")
    return p


def parse_overrides(pairs: Sequence[str]) -> dict[str, object]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}``: values stay text for the config to
    parse (as YAML scalars, ``1e-4`` included)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set takes KEY=VALUE (e.g. --set base.steps=500), got {pair!r}")
        value = value.strip()
        out[key.strip()] = value
    return out


def resolve_config(args: argparse.Namespace):
    """``(config, source, run_dir)``: the :class:`rcfd.config.PipelineConfig` that the
    arguments describe, a few words saying where it came from, and the run directory.

    The config is ``--config FILE``, else ``--preset``, else the run directory's own
    ``config.json`` when a single stage (or ``--resume``) is asked of an existing run, else
    the default preset; then ``--device``/``--seed`` and every ``--set`` are applied as
    dotted overrides."""
    from rcfd import config as C
    from rcfd import presets as P

    overrides: dict[str, object] = {}
    if args.device is not None:
        overrides["device"] = args.device
    if args.seed is not None:
        overrides["seed"] = args.seed
    overrides.update(parse_overrides(args.overrides))
    file = Path(args.config) if args.config else None
    preset = args.preset or P.DEFAULT_PRESET
    out = Path(args.out) if args.out else None
    if file is None and args.preset is None and (args.stage != "all" or args.resume):
        saved = (out or Path("runs") / preset) / "config.json"
        file = saved if saved.is_file() else None
    source = f"config file {file}" if file else f"preset {preset}"
    if overrides:
        source += f" + {len(overrides)} override{'s' if len(overrides) > 1 else ''}"
    try:
        if file is not None:
            if not file.is_file():
                raise FileNotFoundError(f"config file {file} does not exist")
            cfg = C.load_config(file, overrides)
        else:
            cfg = P.get_preset(preset).with_overrides(overrides)
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"invalid configuration: {e.args[0] if isinstance(e, KeyError) and e.args else e}") from None
    except __import__("yaml").YAMLError as e:
        raise UsageError(f"{file} is not valid YAML: {e}") from None
    return cfg, source, out or Path("runs") / cfg.name


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.skip_nonfinite < 0:
        raise UsageError(f"--skip-nonfinite must be >= 0, got {args.skip_nonfinite}")
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    if args.resume and args.overwrite:
        raise UsageError("--resume keeps finished stages and --overwrite retrains them: pick one")
    cfg, source, out = resolve_config(args)
    if args.dry_run:
        print(cfg.to_json())
        return 0
    from rcfd import distributed, pipeline
    from rcfd.trainers.loop import Interrupted

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
    from rcfd.train import main as _entry  # one module identity for the error classes

    sys.exit(_entry())
