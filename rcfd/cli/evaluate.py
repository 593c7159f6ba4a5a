"""FID, KID, precision/recall and IS of any diffusion checkpoint (ours or a reference-format
one) with the evaluation panel, against the held-out test split and the training split
(METHOD.md, "Evaluation"; docs/results-digits.md, "How samples are measured").

    python -m rcfd.evaluate runs/digits/pd/T1.safetensors --steps 1
    python -m rcfd.evaluate runs/digits/base/model.safetensors --steps 1 2 4 8 \\
        --sampler dpm-solver --classifier runs/digits/classifier/eval.safetensors \\
        --floor --json base.json
    python -m rcfd.evaluate ckpt.pt --data cifar10 --data-path ~/data/cifar-10-batches-py \\
        --extractor inception --inception-weights ~/weights-inception-2015-12-05-6726825d.pth

Extractors (``--extractor``, default ``auto``: ``random-conv`` and ``pixels``, plus
``classifier`` when ``--classifier`` is given, ``mlp-classifier`` when ``--mlp-classifier``
is, and ``inception`` when its weights are here): ``classifier`` (an evaluation classifier,
never the ``--distillation-classifier``), ``mlp-classifier`` (a run's MLP classifier,
``classifier/mlp.safetensors``), ``random-conv``, ``pixels``, ``pca``, ``inception``. Every number is printed with its
extractor and reference split. ``--floor`` also samples a second set (another seed) of the
first step count and prints the noise floors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rcfd.cli.common import (
    add_common_args,
    add_model_args,
    add_progress_arg,
    add_sampler_arg,
    add_seed_arg,
    load_model,
    positive,
    resolve_device,
    run_cli,
)
from rcfd.io.files import write_json
from rcfd.core.schedule import describe_schedule
from rcfd.errors import UsageError
from rcfd.data.images import DATASET_NAMES
from rcfd.evaluation import (
    EXTRACTOR_NAMES,
    EvalSettings,
    References,
    build_panel,
    dataset_spec_for,
    evaluate_rows,
    load_references,
    panel_names,
)
from rcfd.methods.registry import Row
from rcfd.report.results import floors_table
from rcfd.samplers import sampling_dtype


# This command's overrides of the shared evaluation defaults (rcfd.evaluation.EvalSettings): a
# quick check of one checkpoint, not a 50,000-sample FID (the batch size sets memory only).
QUICK = {"num_samples": 1000, "batch_size": 250}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rcfd.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="diffusion checkpoint (rcfd or reference format)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="sampling steps to evaluate (default: the checkpoint's T)")
    add_sampler_arg(p)
    p.add_argument("--num-samples", type=int, default=QUICK["num_samples"],
                   help=f"samples per number of steps (default {QUICK['num_samples']}: a quick check; "
                        f"the evaluation's own default, the standard FID count, is "
                        f"{EvalSettings().num_samples})")
    p.add_argument("--batch-size", type=int, default=QUICK["batch_size"],
                   help=f"sampling batch (default {QUICK['batch_size']}; memory only: image i's "
                        f"noise depends on --seed and i alone)")
    add_seed_arg(p, default=0)
    p.add_argument("--data", choices=DATASET_NAMES, default=None,
                   help="reference data; default: what the checkpoint records, or digits")
    p.add_argument("--data-path", default=None, help="CIFAR-10 copy or image folder")
    add_model_args(p)
    p.add_argument("--extractor", nargs="+", choices=("auto", *EXTRACTOR_NAMES), default=["auto"],
                   help="the panel (default auto: random-conv, pixels, + classifier with --classifier, "
                        "+ mlp-classifier with --mlp-classifier, "
                        "+ inception when its weights are here)")
    p.add_argument("--primary", default=None, help="extractor of the summary numbers in --json (default: "
                   "classifier when measured, else the first)")
    p.add_argument("--reference", choices=("test", "train"), default="test",
                   help="reference split listed first and used for the summary numbers (default test)")
    p.add_argument("--classifier", metavar="CKPT", default=None, help="evaluation classifier checkpoint")
    p.add_argument("--mlp-classifier", metavar="CKPT", default=None,
                   help="MLP classifier checkpoint (a run's classifier/mlp.safetensors): the mlp-classifier extractor")
    p.add_argument("--classifier-arch", default=None, help="architecture of a reference-format classifier")
    p.add_argument("--distillation-classifier", metavar="CKPT", default=None,
                   help="the classifier distilled into: refused as the evaluation classifier")
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help="torch-fidelity's Inception weights file (weights-inception-2015-12-05)")
    p.add_argument("--floor", action="store_true", help="also measure the noise floors (a second sample set)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    add_progress_arg(p)
    add_common_args(p)
    return p


def extractor_names(args: argparse.Namespace) -> tuple[str, ...]:
    """``--extractor`` resolved: ``auto`` expands as the module docstring says."""
    if "auto" not in args.extractor:
        return tuple(dict.fromkeys(args.extractor))
    names = ["random-conv", "pixels"] + (["classifier"] if args.classifier else [])
    names += ["mlp-classifier"] if args.mlp_classifier else []
    names += [n for n in args.extractor if n != "auto" and n not in names]
    return panel_names(names, "auto", args.inception_weights)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("num_samples", "batch_size"):
        positive(f"--{name.replace('_', '-')}", getattr(args, name))
    device = resolve_device(args.device)
    model, info = load_model(args, device)
    spec = dataset_spec_for(info, args.data, args.data_path, args.image_size)
    references = References(load_references(spec), device=device, batch_size=args.batch_size)
    shape = (info.config.in_channels, info.config.image_size, info.config.image_size)
    if tuple(references.image_shape) != shape:
        raise UsageError(f"the model makes {shape} images but the {spec.name} references hold "
                         f"{references.image_shape} ones; name the right data with --data")
    names = extractor_names(args)
    panel = build_panel(names, shape, train_images=references.datasets["train"].images,
                        classifier=args.classifier, classifier_arch=args.classifier_arch,
                        distillation_classifier=args.distillation_classifier,
                        inception_weights=args.inception_weights, device=device,
                        mlp_classifier=args.mlp_classifier)
    primary = args.primary or ("classifier" if "classifier" in names else names[0])
    settings = EvalSettings(num_samples=args.num_samples, batch_size=args.batch_size, extractors=names,
                            primary=primary, reference=args.reference, floor="first" if args.floor else "none",
                            dtype=args.dtype)
    steps = args.steps or [info.T]
    for s in steps:
        if s < 1 or s > info.T or info.T % s:
            raise UsageError(f"--steps {s} must divide the checkpoint's T={info.T} (try a power of two <= {info.T})")
    print(f"checkpoint {args.checkpoint}: T={info.T}, time_scale={info.time_scale}, {info.source} format "
          f"({info.weights}), prediction {info.prediction}, schedule "
          f"{describe_schedule(info.noise_schedule)}; references {spec.name} {references.counts}; extractors "
          + ", ".join(f"{e.name} = {e.detail}" for e in panel), flush=True)
    label = Path(args.checkpoint).stem
    rows = [Row(method="checkpoint", label=label, steps=s, stage=str(Path(args.checkpoint).parent), unit=label,
                sampler=args.sampler) for s in steps]
    results = evaluate_rows(rows, lambda row: (model, info), eval_cfg=settings, references=references,
                            extractors=panel, device=device, seed=args.seed, progress=not args.no_progress,
                            use_cuda_graph=not args.no_cuda_graph)
    results.update(checkpoint=str(args.checkpoint), sampler=args.sampler,
                   dtype=sampling_dtype(args.dtype, device))
    if args.floor:
        print("noise floors:\n" + floors_table(results), flush=True)
    if args.json:
        print(f"wrote {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
