"""Choose the classifier's augmentation recipe by validation accuracy.

Trains a preset's distillation classifier (its architecture, steps and optimiser) once per
recipe and training seed, and prints the accuracy on the classifier stage's validation part
of the training split (what the choice is made on) and, for the record only, on the held-out
test split. The recipes differ only in the crop's padding value and the Cutout hole:

    grey-pad/half-cutout    pad with 0.0 (mid-grey), hole of half the side (the old recipe)
    bg-pad/half-cutout      pad with the data's background (its minimum pixel value)
    bg-pad/quarter-cutout   the background, and a hole of a quarter of the side
    bg-pad/no-cutout        the background, no Cutout

    python scripts/classifier_recipes.py                    # digits preset, seeds 0 1 2
    python scripts/classifier_recipes.py --seeds 0 --steps 50

Writes its checkpoints into a temporary folder (``--out`` to keep them).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from rcfd.methods.classifier import classifier_record, train_classifier
from rcfd.study.presets import get_preset
from rcfd.training.rundir import RunContext

RECIPES = {
    "grey-pad/half-cutout": {"pad_fill": 0.0, "cutout_fraction": 0.5},
    "bg-pad/half-cutout": {"pad_fill": "background", "cutout_fraction": 0.5},
    "bg-pad/quarter-cutout": {"pad_fill": "background", "cutout_fraction": 0.25},
    "bg-pad/no-cutout": {"pad_fill": "background", "cutout": False},
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="digits", help="whose distill_classifier section to train")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="keep the checkpoints here")
    return p.parse_args(argv)


def run(args: argparse.Namespace, out: Path) -> list[dict]:
    """One classifier per (recipe, seed); its validation and test accuracy and seconds."""
    cfg = get_preset(args.preset)
    base = cfg.distill_classifier
    if args.steps is not None:
        base = base.replace(steps=args.steps, epochs=None, eval_interval=min(base.eval_interval or args.steps,
                                                                             args.steps))
    rows = []
    for name, recipe in ((n, RECIPES[n]) for n in args.recipes):
        for seed in args.seeds:
            run_dir = out / name.replace("/", "_") / f"seed{seed}"
            t0 = time.perf_counter()
            path = train_classifier(base.replace(**recipe), cfg.data,
                                    RunContext(run_dir, device="cpu", seed=seed, progress=False))
            rec = classifier_record(path, "distill")
            rows.append({"recipe": name, "seed": seed, "val": rec["val_accuracy"], "test": rec["test_accuracy"],
                         "seconds": time.perf_counter() - t0})
            print(f"{name:24s} seed {seed}: validation {rec['val_accuracy']:.4f}  test {rec['test_accuracy']:.4f}  "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Mean (min-max) over seeds per recipe, the best validation mean marked."""
    names = list(dict.fromkeys(r["recipe"] for r in rows))
    mean = {n: sum(r["val"] for r in rows if r["recipe"] == n) / sum(r["recipe"] == n for r in rows) for n in names}
    best = max(names, key=mean.get)
    lines = ["| recipe | validation accuracy, mean (range) | test accuracy, mean (range) | seeds |", "|---|---|---|---|"]
    for n in names:
        mine = [r for r in rows if r["recipe"] == n]
        cols = []
        for k in ("val", "test"):
            v = [r[k] for r in mine]
            cols.append(f"{100 * sum(v) / len(v):.2f}% ({100 * min(v):.2f}-{100 * max(v):.2f})")
        lines.append(f"| {n}{' (best)' if n == best else ''} | {cols[0]} | {cols[1]} | {len(mine)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args, args.out or Path(tmp))
    print()
    print(table(rows))
    print(f"\n{len(rows)} classifiers in {time.perf_counter() - t0:.0f} s; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {args.threads} thread(s); "
          f"command: python scripts/classifier_recipes.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
