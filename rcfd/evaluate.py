"""IS / FID / KID of any diffusion checkpoint (ours or a reference-format one), and the pieces
the pipeline evaluates with (METHOD.md, "Evaluation").

    python -m rcfd.evaluate runs/digits/checkpoints/rcfd_1.pt --steps 1
    python -m rcfd.evaluate base.pt --steps 1 2 4 8 --classifier runs/digits/checkpoints/eval_classifier.pt
    python -m rcfd.evaluate ckpt.pt --data cifar10 --data-path ~/data/cifar-10-batches-py \\
        --inception-weights ~/weights-inception-2015-12-05-6726825d.pth

The feature extractor is the standard Inception when its weights are on this machine
(``--inception-weights`` or torch hub's cache), else the evaluation classifier given with
``--classifier``; the one used for distillation (``--distillation-classifier``) is refused.
Every number is printed with the extractor's name. Samples come from
:func:`rcfd.sampling.generate` (a CUDA-graph sampler on a GPU), split over the ranks of a
``torchrun`` launch and gathered for the metrics on rank 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from rcfd.train import (
    UsageError,
    add_common_device_args,
    add_model_args,
    load_model,
    resolve_device,
    run_cli,
)


# --------------------------------------------------------------------------- classifiers


def load_classifier(path: str | Path, device: Any = "cpu", arch: str | None = None) -> tuple[nn.Module, str]:
    """A classifier checkpoint (ours, or a reference ``{'model': state_dict}`` whose
    architecture ``arch`` must then be named), in eval mode on ``device``: ``(module, arch)``.
    Loading is :func:`rcfd.trainers.classifier.load_classifier`'s."""
    from rcfd.trainers.classifier import load_classifier as _load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint {path} does not exist")
    try:
        model = _load(path, device, arch)
    except ValueError as e:
        if arch is None and "architecture" in str(e):
            raise UsageError(f"{path} is a reference classifier checkpoint ({{'model': state_dict}}), which "
                             "does not record its architecture: name it with --classifier-arch "
                             "(e.g. resnet18)") from None
        raise UsageError(f"classifier checkpoint {path}: {e}") from None
    return model, model.config.name


def make_extractor(image_shape: tuple[int, int, int], *, inception_weights: str | None = None,
                   classifier: str | Path | None = None, classifier_arch: str | None = None,
                   distillation_classifier: str | Path | None = None, distillation_arch: str | None = None,
                   prefer: str = "auto", device: Any = "cpu"):
    """The :class:`rcfd.metrics.Extractor` to measure with: Inception when its weights are
    here (``prefer="auto"``), else the evaluation ``classifier`` checkpoint, refused when its
    weights equal the ``distillation_classifier``'s."""
    from rcfd import metrics

    if prefer == "inception" or prefer == "auto" and (inception_weights or metrics.find_inception_weights()):
        try:
            return metrics.inception_extractor(inception_weights)
        except ValueError as e:
            raise UsageError(f"Inception weights: {e}") from None
    if classifier is None:
        raise UsageError(
            "no feature extractor: the Inception weights are not on this machine (looked for "
            f"{metrics.inception_cache_path()}; pass --inception-weights PATH) and no evaluation "
            "classifier was given (--classifier CKPT: one trained on the data, NOT the distillation one)")
    module, arch = load_classifier(classifier, device, classifier_arch)
    kwargs = {}
    if distillation_classifier is not None:
        kwargs["distillation_fingerprint"] = metrics.module_fingerprint(
            load_classifier(distillation_classifier, "cpu", distillation_arch or classifier_arch)[0])
    try:
        return metrics.choose_extractor(classifier=module, arch=arch, image_shape=image_shape,
                                        prefer="classifier", **kwargs)
    except ValueError as e:
        raise UsageError(f"--classifier {classifier}: {e}") from None


def extractor_for_run(cfg, run_dir: Path, image_shape, device):
    """The feature extractor of a pipeline run (``cfg``: a
    :class:`rcfd.config.PipelineConfig`): Inception (``eval.extractor`` ``"inception"``, or
    ``"auto"`` with its weights here), else the evaluation classifier, never the one RCFD
    distilled into."""
    from rcfd.trainers import checkpoint_path, resolve_classifier

    distill = resolve_classifier(cfg.rcfd, run_dir)
    distill = distill if isinstance(distill, Path) and distill.is_file() else None
    eval_ckpt = checkpoint_path(run_dir, "classifier", "eval") if cfg.eval_classifier is not None else None
    if cfg.eval.extractor == "classifier" and not eval_ckpt.is_file():
        raise UsageError(f"{eval_ckpt} does not exist: train the evaluation classifier first "
                         f"(python -m rcfd.train classifier --out {run_dir})")
    return make_extractor(image_shape, inception_weights=cfg.eval.inception_weights,
                          classifier=eval_ckpt if eval_ckpt is not None and eval_ckpt.is_file() else None,
                          distillation_classifier=distill, distillation_arch=cfg.rcfd.classifier_arch,
                          prefer=cfg.eval.extractor, device=device)


def check_extractor_available(cfg) -> str:
    """Check before any training that the evaluation will have an extractor; say which."""
    from rcfd import metrics

    try:
        found = metrics.find_inception_weights(cfg.eval.inception_weights)
    except FileNotFoundError as e:
        raise UsageError(f"eval.inception_weights: {e}") from None
    if cfg.eval.extractor == "inception" and found is None:
        raise UsageError(f"eval.extractor='inception' but the Inception weights are not on this machine "
                         f"(looked for {metrics.inception_cache_path()}): put {metrics.INCEPTION_FILE} "
                         "there, set eval.inception_weights=PATH, or use eval.extractor=classifier with "
                         "an eval_classifier stage")
    if found is not None and cfg.eval.extractor != "classifier":
        return f"Inception ({found})"
    if cfg.eval_classifier is None:
        raise UsageError("no evaluation extractor: the Inception weights are not on this machine "
                         f"(looked for {metrics.inception_cache_path()}) and the config has no "
                         "eval_classifier stage; set eval.inception_weights=PATH or add an eval_classifier")
    return f"the evaluation classifier ({cfg.eval_classifier.arch}, not the distillation one)"


# --------------------------------------------------------------------------- sampling


def sample_images(model: nn.Module, info, *, num_samples: int, num_steps: int, batch_size: int,
                  device: Any = "cpu", seed: int = 0, dist=None, use_cuda_graph: bool = True,
                  progress: bool = True) -> torch.Tensor | None:
    """``num_samples`` images (uint8 ``[N, C, H, W]`` on the CPU) from a diffusion model with
    an ``num_steps``-step DDIM sampler, through :func:`rcfd.sampling.generate`. Under
    ``torchrun`` (``dist``: a :class:`rcfd.distributed.DistInfo`) each rank makes its block
    of :func:`rcfd.distributed.shard_range` and rank 0 gets them all, in rank order (the
    other ranks get ``None``). Every block starts from the noise one process would draw
    from ``seed`` for those samples, so the set is the same for any number of processes."""
    from rcfd import distributed
    from rcfd.data import to_uint8
    from rcfd.sampling import generate

    dist = dist or distributed.SINGLE
    device = torch.device(device)
    block = distributed.shard_range(num_samples, dist)
    n = len(block)
    cfg = info.config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    out, bad = [], 0
    if n:
        for x in generate(model, num_samples, min(batch_size, num_samples), shape=shape,
                          T=info.T, time_scale=info.time_scale, num_steps=num_steps,
                          device=device, seed=seed, prediction=info.prediction,
                          use_cuda_graph=use_cuda_graph, progress=progress and dist.is_main,
                          indices=block):
            finite = torch.isfinite(x).flatten(1).all(1)
            bad += int((~finite).sum())
            out.append(to_uint8(torch.nan_to_num(x, nan=0.0)).cpu())
    if bad:
        warnings.warn(f"{bad} of {n} samples ({num_steps} steps) hold NaN or inf: the sampler diverged; "
                      "they are measured with NaN set to 0", RuntimeWarning, stacklevel=2)
    images = torch.cat(out) if out else torch.empty((0, *shape), dtype=torch.uint8)
    return distributed.gather_cat(images, dist, dst=0)


# --------------------------------------------------------------------------- metrics


def measure(images: torch.Tensor, reference, extractor, *, device: Any = "cpu",
            run_dir: str | Path | None = None, seed: int = 0, batch_size: int = 250,
            kid: bool = True) -> dict:
    """IS / FID / KID of uint8 ``images`` against ``reference`` (the training set) with
    :func:`rcfd.metrics.evaluate`; the result names the extractor."""
    from rcfd.metrics import evaluate

    n = images.shape[0]
    if n < 10:
        raise UsageError(f"need at least 10 samples for IS (10 splits) and FID, got {n}; raise --num-samples")
    return evaluate(images, reference, extractor, batch_size=batch_size, device=device,
                    run_dir=None if run_dir is None else str(run_dir), seed=seed, kid=kid,
                    kid_subset_size=min(1000, n, len(reference)))


def dataset_spec_for(info, data: str | None = None, data_path: str | None = None,
                     image_size: int | None = None):
    """The training set to measure against: ``data`` (+ ``data_path``) when given, else the
    dataset the checkpoint records (``extra["data"]``), else ``digits`` for a 16 px,
    one-channel model; anything else must be named."""
    from rcfd.data import DatasetSpec

    cfg = info.config
    size = image_size or cfg.image_size
    if data is not None:
        return DatasetSpec(name=data, path=data_path, image_size=size, channels=cfg.in_channels)
    recorded = info.extra.get("data") or info.extra.get("dataset")
    if isinstance(recorded, Mapping):
        return DatasetSpec.from_dict(dict(recorded))
    if (cfg.image_size, cfg.in_channels) == (16, 1):
        return DatasetSpec(name="digits")
    raise UsageError(f"the checkpoint does not record its dataset ({cfg.in_channels} channels, "
                     f"{cfg.image_size} px): name it with --data (cifar10 or folder) and --data-path")


def load_reference(spec):
    """The training split of ``spec``, with a usage error for a missing or unreadable path."""
    from rcfd.data import load_dataset

    try:
        return load_dataset(spec, "train")
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise UsageError(f"cannot read the {spec.name} data at {spec.path}: {e}") from None


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rcfd.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="diffusion checkpoint (rcfd or reference format)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="sampling steps to evaluate (default: the checkpoint's T)")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per number of steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the samples")
    p.add_argument("--data", choices=("digits", "cifar10", "folder"), default=None,
                   help="reference (training) set; default: what the checkpoint records, or digits")
    p.add_argument("--data-path", default=None, help="CIFAR-10 copy or image folder")
    add_model_args(p)
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help="torch-fidelity's Inception weights file (pt_inception-2015-12-05)")
    p.add_argument("--classifier", metavar="CKPT", default=None,
                   help="evaluation classifier, used when no Inception weights are here")
    p.add_argument("--classifier-arch", default=None, help="architecture of a reference-format classifier")
    p.add_argument("--distillation-classifier", metavar="CKPT", default=None,
                   help="the classifier distilled into: refused as the extractor")
    p.add_argument("--extractor", choices=("auto", "inception", "classifier"), default="auto")
    p.add_argument("--no-kid", action="store_true", help="skip KID")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    add_common_device_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    from rcfd.report import METRICS

    args = build_parser().parse_args(argv)
    if args.num_samples < 10:
        raise UsageError(f"--num-samples must be at least 10, got {args.num_samples}")
    device = resolve_device(args.device)
    model, info = load_model(args, device)
    spec = dataset_spec_for(info, args.data, args.data_path, args.image_size)
    reference = load_reference(spec)
    shape = (reference.channels, reference.image_size, reference.image_size)
    if shape != (info.config.in_channels, info.config.image_size, info.config.image_size):
        raise UsageError(f"the model makes {info.config.in_channels}x{info.config.image_size}px images but "
                         f"the {spec.name} reference set holds {shape[0]}x{shape[1]}px ones")
    extractor = make_extractor(shape, inception_weights=args.inception_weights, classifier=args.classifier,
                               classifier_arch=args.classifier_arch, prefer=args.extractor,
                               distillation_classifier=args.distillation_classifier, device=device)
    print(f"checkpoint {args.checkpoint}: T={info.T}, time_scale={info.time_scale}, {info.source} format "
          f"({info.weights}); reference {spec.name} train ({len(reference)} images); extractor {extractor.label}",
          flush=True)
    results = []
    for steps in args.steps or [info.T]:
        images = sample_images(model, info, num_samples=args.num_samples, num_steps=steps,
                               batch_size=args.batch_size, device=device, seed=args.seed,
                               use_cuda_graph=not args.no_cuda_graph)
        print(f"{steps} step{'s' if steps > 1 else ''}: ", end="", flush=True)
        r = measure(images, reference, extractor, device=device, seed=args.seed, kid=not args.no_kid)
        results.append({"checkpoint": str(args.checkpoint), "steps": steps,
                        **{k: v for k, v in r.items() if k in METRICS or k.endswith("_std")
                           or k in ("extractor", "num_samples", "num_reference", "reference")}})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from rcfd.evaluate import main as _entry  # one module identity for the error classes

    sys.exit(_entry())
