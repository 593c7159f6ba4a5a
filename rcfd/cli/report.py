"""The paired study of finished seed runs, written again from their results alone (nothing is
sampled or trained): ``study.md``, ``study.json``, ``per_seed.csv`` and the plots, by the same
function that ``python -m rcfd.train --seeds N`` ends with
(:func:`rcfd.report.study.write_study`).

    python -m rcfd.report runs/digits/seed0 runs/digits/seed1 runs/digits/seed2 --out runs/study3
    python -m rcfd.report runs/a/seed* runs/b/seed* --out runs/study10 --title "10 seeds"

Each SEED_DIR is the run directory of one seed (``results.json`` and ``config.json``, as
``python -m rcfd.train`` leaves them), so seeds run by separate commands, processes or
machines make one study. They must be one study: their configs may differ only in ``seed``
(the evaluation settings included; the CPU thread count is part of the config and changes the
numbers the way a seed does), their seeds must differ, and the platforms their results record
must agree in the package version, commit, torch, Python, device and thread count. Results
written before the platform was recorded in ``results.json`` need ``--platform FILE``: a
JSON object with the record a study's header shows (``rcfd``, ``commit``, ``torch``,
``python``, ``device``, ``device_name``, ``threads``, ``machine``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from rcfd.cli.common import run_cli
from rcfd.errors import UsageError
from rcfd.io.files import read_json
from rcfd.report.results import check_results
from rcfd.report.study import write_study
from rcfd.study.config import load_config
from rcfd.study.pipeline import comparisons
from rcfd.study.presets import PRESET_CONFIGS

# What must agree between the platforms of a study's seeds (the CPU model may differ by name).
SAME_PLATFORM = ("rcfd", "commit", "torch", "python", "device", "threads")
RESULTS_JSON, CONFIG_JSON = "results.json", "config.json"


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m rcfd.report`` parser (module docstring)."""
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m rcfd.report", description=doc[0],
                                epilog="examples:\n" + doc[1] + "\n\n" + "\n\n".join(doc[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("seed_dirs", nargs="+", metavar="SEED_DIR",
                   help="a finished seed's run directory (results.json, config.json)")
    p.add_argument("--out", required=True, help="the study's folder (created; its study files are replaced)")
    p.add_argument("--platform", default=None, metavar="FILE",
                   help="JSON platform record, for results that do not record their own")
    p.add_argument("--title", default=None, help="study.md's title (default: 'Study: <preset>, N seeds')")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also RCFD_DEBUG=1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rcfd.report``: exit 0, or 2 with one ``error: ...`` line (nothing written)."""
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    dirs = [Path(d) for d in args.seed_dirs]
    per_seed, cfg = read_seeds(dirs)
    given = None if args.platform is None else _platform_file(Path(args.platform))
    platform = study_platform(per_seed, dirs, given)
    paths = write_study(args.out, per_seed, comparisons(cfg), commit=platform.get("commit") or "unknown",
                        platform=platform, title=args.title)
    print(f"study over {len(per_seed)} seeds ({', '.join(str(r['seed']) for r in per_seed)}): "
          + ", ".join(str(p) for p in paths.values()))
    return 0


def read_seeds(dirs: Sequence[Path]) -> tuple[list[dict], Any]:
    """Each seed's results (``run_dir`` set to the folder it is read from, so the study's links
    point at it) and the study's config; :class:`~rcfd.errors.UsageError` unless they are one
    study (module docstring)."""
    per_seed, configs = [], []
    for d in dirs:
        for name in (RESULTS_JSON, CONFIG_JSON):
            if not (d / name).is_file():
                raise UsageError(f"{d / name} does not exist: give the run directory of one evaluated "
                                 "seed (python -m rcfd.train ... --out DIR leaves DIR/results.json)")
        results = read_json(d / RESULTS_JSON, "a seed's results")
        try:
            check_results(results)
        except ValueError as e:
            raise UsageError(f"{d / RESULTS_JSON}: {e}") from None
        per_seed.append({**results, "run_dir": str(d)})
        configs.append(load_config(d / CONFIG_JSON, {}, PRESET_CONFIGS))
    first = configs[0].to_dict()
    for d, c in zip(dirs[1:], configs[1:]):
        now = c.to_dict()
        changed = sorted(k for k in set(first) | set(now) if k != "seed" and first.get(k) != now.get(k))
        if changed:
            raise UsageError(f"{d} is not a seed of the study of {dirs[0]}: their config.json differ in "
                             f"{', '.join(changed)} (seeds of one study differ only in seed)")
    seeds = [c.seed for c in configs]
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise UsageError(f"seed {', '.join(map(str, twice))} is given twice; a study pairs distinct seeds")
    for d, r, c in zip(dirs, per_seed, configs):
        if r.get("seed") != c.seed:
            raise UsageError(f"{d}: results.json is of seed {r.get('seed')} but config.json of seed "
                             f"{c.seed}; evaluate the run again (python -m rcfd.train evaluate --out {d})")
    return per_seed, configs[0]


def study_platform(per_seed: Sequence[Mapping], dirs: Sequence[Path], given: Mapping | None) -> dict:
    """The platform record of the study: the one every seed's results carry (they must agree in
    :data:`SAME_PLATFORM`), or ``given`` when none carries one."""
    recorded = [r.get("platform") for r in per_seed]
    if given is not None:
        if any(p is not None for p in recorded):
            raise UsageError("--platform is for results that do not record their platform, and these "
                             "record it; leave --platform out")
        return dict(given)
    missing = [str(d) for d, p in zip(dirs, recorded) if p is None]
    if missing:
        raise UsageError(f"{missing[0]}/results.json does not record its platform (it was written by an "
                         "older rcfd): give --platform FILE, a JSON object with the commit, torch, "
                         "threads... the seeds ran with")
    first = recorded[0]
    for d, p in zip(dirs[1:], recorded[1:]):
        differ = [k for k in SAME_PLATFORM if p.get(k) != first.get(k)]
        if differ:
            k = differ[0]
            raise UsageError(f"{d} ran on another platform than {dirs[0]} ({k} {p.get(k)} vs "
                             f"{first.get(k)}); a study's seeds share code, torch and threads")
    return dict(first)


def _platform_file(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"--platform {path} does not exist")
    record = read_json(path, "the platform record")
    if not isinstance(record, dict) or not all(isinstance(k, str) for k in record):
        raise UsageError(f"--platform {path} must hold a JSON object (e.g. {{\"commit\": ..., "
                         "\"torch\": ..., \"threads\": 1}})")
    return record


if __name__ == "__main__":
    sys.exit(main())
