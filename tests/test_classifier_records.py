"""Every classifier's accuracy reaches the reports: the classifier stage's checkpoint records
its held-out test accuracy, :func:`rcfd.methods.classifier.run_classifiers` carries it into
results.json, results.md shows it, and study.md gives its mean and range over seeds (or says
it was not recorded, as in results written before it was); the augmentation options of the
stage config are checked."""

import pytest
import torch
from test_report import _results
from test_stats import COMPARISONS, study

from rcfd.data import DatasetSpec, load_dataset
from rcfd.methods.classifier import (
    ClassifierStageConfig,
    accuracy,
    load_classifier,
    run_classifiers,
    train_classifier,
)
from rcfd.methods.common import TrainOptions
from rcfd.report import results as report
from rcfd.report import study as study_report
from rcfd.training.rundir import RunContext

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = TrainOptions(bf16=False, channels_last=False, fused=False, compile=False)


def test_a_trained_classifier_records_its_test_accuracy(tmp_path):
    data = DatasetSpec(name="digits", image_size=8)
    cfg = ClassifierStageConfig(arch="resnet18", width=4, epochs=None, steps=6, batch_size=32, lr=0.05,
                                autoaugment=False, eval_interval=3, options=CPU)
    path = train_classifier(cfg, data, RunContext(tmp_path, device="cpu", progress=False))
    records = run_classifiers(distill=path, evaluation=None)
    assert list(records) == ["distill"]
    rec = records["distill"]
    want = accuracy(load_classifier(path), load_dataset(data, "test"), torch.device("cpu"))
    assert rec["test_accuracy"] == want and 0 <= rec["val_accuracy"] <= 1
    assert (rec["role"], rec["arch"], rec["width"], rec["steps"], rec["extractor"]) == ("distill", "resnet18", 4, 6, None)
    other = run_classifiers(distill=tmp_path / "missing.pt", evaluation=path)  # not a file: nothing known
    assert other["distill"]["test_accuracy"] is None and other["eval"]["extractor"] == "classifier"


CLASSIFIERS = {"distill": {"role": "distill", "arch": "resnet18", "width": 8, "steps": 300, "val_accuracy": 0.95,
                           "test_accuracy": 0.9612},
               "eval": {"role": "eval", "extractor": "classifier", "arch": "resnet18", "width": 8, "steps": 300,
                        "val_accuracy": 0.94, "test_accuracy": None}}


def test_results_md_shows_each_classifier():
    md = report.results_markdown({**_results(), "classifiers": CLASSIFIERS})
    assert "| distill | distill | - | resnet18 (width 8) | 300 | 95.00% | 96.12% |" in md
    assert "| eval | eval | `classifier` | resnet18 (width 8) | 300 | 94.00% | not recorded |" in md
    assert "Classifier accuracies: not recorded" in report.results_markdown(_results())  # older results.json


def test_study_md_gives_mean_and_range_over_seeds(tmp_path):
    per_seed = study()
    for k, r in enumerate(per_seed):
        if k != 3:  # one seed predates the record
            r["classifiers"] = {"distill": dict(CLASSIFIERS["distill"], test_accuracy=0.90 + k / 100),
                                "eval": CLASSIFIERS["eval"]}
    paths = study_report.write_study(tmp_path, per_seed, COMPARISONS, commit="abc", platform={})
    md = paths["md"].read_text()
    values = [0.90 + k / 100 for k in range(10) if k != 3]
    mean = sum(values) / len(values)
    assert f"| distill | distill | resnet18 | {100 * mean:.2f}% | 90.00% – 99.00% | 9 of 10 |" in md
    assert "| eval | eval | resnet18 | not recorded | not recorded | 0 of 10 |" in md
    older = study_report.write_study(tmp_path / "old", study(), COMPARISONS, commit="abc", platform={})
    assert "Classifier test accuracies: not recorded" in older["md"].read_text()


def test_stage_config_pad_fill_and_cutout_fraction():
    """The crop's fill is a value in image units or "background"; the Cutout hole a fraction
    of the side in (0, 1]; anything else is refused with the field named."""
    assert ClassifierStageConfig(pad_fill="background").pad_fill == "background"
    assert ClassifierStageConfig(pad_fill=-1.0, cutout_fraction=0.25).cutout_fraction == 0.25
    for bad in ({"pad_fill": "grey"}, {"pad_fill": 2.0}, {"cutout_fraction": 0.0}, {"cutout_fraction": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ClassifierStageConfig(**bad)
