"""`python -m rcfd.train` end to end on the CPU: every artifact of a run directory exists and
is well-formed, finished stages are protected, single stages and --resume work, and a
multi-seed study aggregates. The default run uses the `smoke` preset shrunk further with
--set; the full `smoke` preset and the multi-seed study are marked slow."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from rcfd.io import grids
from rcfd.report import results as report
from rcfd.report.results import check_results
from rcfd.io.safetensors import is_safetensors_file
from rcfd.io.checkpoint import load_classifier_checkpoint, load_diffusion_checkpoint, load_model_file
from rcfd.cli import sample, train
from rcfd.methods.classifier import load_classifier
from rcfd.core.classifiers import frozen
from rcfd.evaluation import load_references, sample_images
from rcfd.evaluation.objectives import held_out_draws, objective_losses
from rcfd.evaluation.features import module_fingerprint
from rcfd.study.evaluation import objective_diagnostics
from rcfd.study.pipeline import evaluation_rows
from rcfd.study.config import pipeline_config_class
from rcfd.study.presets import get_preset
from rcfd.study.runinfo import platform_record

TINY = ["--set", "distill_classifier.steps=2", "--set", "eval_classifier.steps=2",
        "--set", "base.steps=2", "--set", "base.checkpoint_interval=1",
        "--set", "pd.steps_per_round=1", "--set", "pd.long_round_steps=1",
        "--set", "rcfd.steps_per_round=1", "--set", "rcfd.long_round_steps=1",
        "--set", "eval.num_samples=20", "--set", "eval.steps=[1,2,8]", "--set", "eval.batch_size=20",
        "--set", "threads=1"]  # one thread: small batches on a shared CPU


def run_train(*argv):
    return train.main(["--device", "cpu", "--no-progress", *argv])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "smoke"
    assert run_train("--preset", "smoke", "--out", str(out), *TINY) == 0
    return out


def check_run_dir(out: Path, cfg) -> dict:
    """Every artifact of a finished run, opened and checked."""
    PipelineConfig = pipeline_config_class()
    saved = json.loads((out / "config.json").read_text())
    assert PipelineConfig.from_dict(saved) == cfg and PipelineConfig.from_dict(saved).to_dict() == saved
    ckpts = [out / "classifier" / "distill.safetensors", out / "classifier" / "eval.safetensors", out / "base" / "model.safetensors"]
    ckpts += [out / "pd" / f"T{t}.safetensors" for t in (8, 4, 2, 1)] + [out / "rcfd" / f"T{t}.safetensors" for t in (4, 2, 1)]
    for p in ckpts:
        assert is_safetensors_file(p) and isinstance(load_model_file(p), dict), p
    for p in ckpts[2:]:
        model, info = load_diffusion_checkpoint(p)
        assert info.T == int(p.stem[1:]) if p.stem.startswith("T") else info.T == cfg.base.T
    results = json.loads((out / report.RESULTS_JSON).read_text())
    pairs = {(r.key, r.steps) for r in evaluation_rows(cfg)}
    assert {(e["key"], e["steps"]) for e in results["entries"]} == pairs
    assert pairs >= {("pd", 1), ("pd", 8), ("rcfd", 1), ("base", cfg.eval.base_steps[0])}
    size = cfg.data.image_size
    for e in results["entries"]:
        for name in cfg.eval.extractors:
            for split in ("test", "train"):
                assert isinstance(e["metrics"][name][split]["fid"], float), (name, split)
        assert e["fid"] == e["metrics"][cfg.eval.primary][cfg.eval.reference]["fid"]
        with Image.open(out / e["grid"]) as im:
            n = min(64, cfg.eval.num_samples)
            assert im.format == "PNG" and im.size == grids.grid_shape(n, size, scale=grids.display_scale(size))
    assert results["extractors"] == list(cfg.eval.extractors) and results["dtype"] == "fp32"
    assert results["floors"]["test_vs_train"] and results["floors"]["two_seeds"]
    # honest evaluation: the evaluation classifier, never the distillation one
    fp = {r: module_fingerprint(load_classifier_checkpoint(out / "classifier" / f"{r}.safetensors")) for r in ("eval", "distill")}
    detail = results["extractor_details"]["classifier"]
    assert fp["eval"][:12] in detail and fp["distill"][:12] not in detail
    md = (out / report.RESULTS_MD).read_text()
    assert report.results_table(results) in md
    for role in ("distill", "eval", "mlp"):  # every classifier's held-out test accuracy, as its checkpoint has it
        extra = load_model_file(out / "classifier" / f"{role}.safetensors")["extra"]
        assert results["classifiers"][role]["test_accuracy"] == extra["test_accuracy"]
    assert results["classifiers"]["mlp"]["extractor"] == "mlp-classifier" and results["classifiers"]["mlp"]["arch"] == "mlp"
    fp["mlp"] = module_fingerprint(load_classifier_checkpoint(out / "classifier" / "mlp.safetensors"))
    assert fp["mlp"][:12] in results["extractor_details"]["mlp-classifier"]
    assert report.classifiers_table(results) in md
    for name in (report.FID_PLOT, report.LOSS_PLOT, results["side_by_side"]):
        with Image.open(out / name) as im:
            assert im.format == "PNG"
    assert set(json.loads((out / "timings.json").read_text())) == {"classifier", "base", "pd", "rcfd", "cd", "evaluate"}
    # the platform python -m rcfd.report checks: this process's code, torch and threads
    here = platform_record(torch.device("cpu"))
    assert set(results["platform"]) == set(here) and results["platform"]["device"] == "cpu"
    assert all(results["platform"][k] == here[k] for k in ("rcfd", "commit", "torch", "python"))
    return results


def test_tiny_smoke_run_artifacts(tiny_run, capsys):
    cfg = get_preset("smoke").with_overrides(train.parse_overrides(TINY[1::2]) | {"device": "cpu"})
    check_run_dir(tiny_run, cfg)


def test_diagnostics_of_every_student_share_one_set_of_draws(tiny_run):
    """results.json holds, for every evaluated PD and RCFD student, its PD and CFD losses and
    its teacher's; every row names the same draws (the run's), and one row recomputed from
    the checkpoints and the held-out split gives the recorded values."""
    results = json.loads((tiny_run / report.RESULTS_JSON).read_text())
    d = results["diagnostics"]
    got = {(r["checkpoint"], r["teacher_checkpoint"]) for r in d["rows"]}
    pairs = {("pd/T8", "base/model"), ("pd/T2", "pd/T4"), ("pd/T1", "pd/T2"), ("rcfd/T2", "rcfd/T4"),
             ("rcfd/T1", "rcfd/T2")}  # eval.steps 1, 2, 8; not CD
    assert got == {(f"{a}.safetensors", f"{b}.safetensors") for a, b in pairs}
    assert {r["draws"] for r in d["rows"]} == {d["draws"]} and d["split"] == "test"
    assert d["classifier"] == "classifier/distill.safetensors" and d["loss"]["tau"] == 0.95
    cfg = get_preset("smoke").with_overrides(train.parse_overrides(TINY[1::2]) | {"device": "cpu"})
    draws = held_out_draws(load_references(cfg.data)["test"], cfg.seed, cfg.eval.diagnostics)
    assert draws.fingerprint == d["draws"] and d["num_samples"] == draws.x0.shape[0] == 64  # the smoke preset's
    student, _ = load_diffusion_checkpoint(tiny_run / "rcfd" / "T1.safetensors")
    teacher, teacher_info = load_diffusion_checkpoint(tiny_run / "rcfd" / "T2.safetensors")
    clf = frozen(load_classifier(tiny_run / "classifier" / "distill.safetensors", in_channels=1))
    want = objective_losses(student, teacher, teacher_info, clf, cfg.rcfd.loss, draws)
    row = next(r for r in d["rows"] if r["checkpoint"] == "rcfd/T1.safetensors")
    for side in ("student", "teacher"):
        assert row[side] == pytest.approx(want[side], rel=1e-6), side
    off = cfg.with_overrides({"eval.diagnostics": 0})
    assert objective_diagnostics(off, evaluation_rows(off), tiny_run, None, "cpu") is None
    md = (tiny_run / report.RESULTS_MD).read_text()
    assert "## Objective diagnostics" in md and report.diagnostics_table(check_results(results).diagnostics) in md


def test_finished_stage_needs_resume_or_overwrite(tiny_run, capsys):
    capsys.readouterr()
    assert run_train("base", "--preset", "smoke", "--out", str(tiny_run), *TINY) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "finished base stage" in err and "--resume" in err and "--overwrite" in err


def test_resume_keeps_finished_stages_and_reevaluates(tiny_run, capsys):
    before = (tiny_run / "pd" / "T1.safetensors").stat().st_mtime_ns
    timings = json.loads((tiny_run / "timings.json").read_text())
    assert run_train("--preset", "smoke", "--out", str(tiny_run), "--resume", *TINY) == 0
    assert (tiny_run / "pd" / "T1.safetensors").stat().st_mtime_ns == before
    after = json.loads((tiny_run / "timings.json").read_text())
    for stage in ("classifier", "base", "pd", "rcfd"):  # skipping a finished stage keeps its time
        assert timings[stage] <= after[stage] < timings[stage] + 5, stage
    out = capsys.readouterr().out
    assert "results:" in out and str(tiny_run / report.RESULTS_MD) in out


def test_header_names_device_backends_and_preset(tiny_run, capsys):
    assert run_train("evaluate", "--preset", "smoke", "--out", str(tiny_run), *TINY) == 0
    out = capsys.readouterr().out
    for needle in ("device   cpu", "threads", "ddim_update ->", "feature_kl ->", "preset smoke", "run dir",
                   "evaluate done in"):
        assert needle in out, needle


def test_single_stage_reuses_the_run_config(tiny_run, capsys):
    """A stage of an existing run, without --preset/--config, runs with RUN_DIR/config.json."""
    assert run_train("evaluate", "--out", str(tiny_run), "--set", "eval.steps=[1]") == 0
    assert f"config file {tiny_run / 'config.json'} + 2 overrides" in capsys.readouterr().out
    results = json.loads((tiny_run / report.RESULTS_JSON).read_text())
    assert results["num_samples"] == 20 and {e["steps"] for e in results["entries"] if e["method"] != "base"} == {1}
    assert run_train("evaluate", "--out", str(tiny_run), *TINY) == 0  # back to the fixture's pairs


def test_sample_cli_on_a_distilled_checkpoint(tiny_run, tmp_path):
    out = tmp_path / "one_step.npz"
    assert sample.main([str(tiny_run / "rcfd" / "T1.safetensors"), "--num", "5", "--out", str(out), "--device", "cpu",
                        "--no-progress"]) == 0
    import numpy as np

    with np.load(out) as z:
        assert z["arr_0"].shape == (5, 16, 16, 1) and int(z["steps"]) == 1


def test_missing_extractor_fails_before_training(tmp_path, capsys, monkeypatch):
    from rcfd.evaluation import extractors, fidelity

    missing = lambda: str(tmp_path / "no-inception.pth")  # noqa: E731
    monkeypatch.setattr(fidelity, "inception_cache_path", missing)
    monkeypatch.setattr(extractors, "inception_cache_path", missing)
    out = tmp_path / "run"
    assert run_train("--preset", "smoke", "--out", str(out), "--set", "eval.inception=always", *TINY) == 2
    err = capsys.readouterr().err
    assert "needs its weights on this machine" in err and "Traceback" not in err
    assert not out.exists()


def test_floor_naming_a_missing_row_fails_before_training(tmp_path, capsys):
    """eval.floor=pd with only CD rows to evaluate is refused before any stage runs."""
    out = tmp_path / "run"
    assert run_train("--preset", "smoke", "--out", str(out), "--set", "eval.methods=[cd]",
                     "--set", "eval.floor=pd", *TINY) == 2
    err = capsys.readouterr().err
    assert "error: eval.floor must be one of" in err and "cd/consistency" in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.cuda
def test_tiny_run_on_gpu(tmp_path):
    """The whole pipeline on a GPU: trainers, CUDA-graph sampling for evaluation, metrics."""
    out = tmp_path / "gpu"
    assert train.main(["--device", "cuda", "--no-progress", "--preset", "smoke", "--out", str(out), *TINY]) == 0
    cfg = get_preset("smoke").with_overrides(train.parse_overrides(TINY[1::2]) | {"device": "cuda"})
    assert json.loads((out / report.RESULTS_JSON).read_text())["device"].startswith("cuda")
    check_run_dir(out, cfg)


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    assert run_train("--preset", "smoke", "--out", str(out), "--set", "threads=1") == 0
    check_run_dir(out, get_preset("smoke").with_overrides({"device": "cpu", "threads": 1}))


@pytest.mark.slow
def test_multi_seed_study(tmp_path, capsys):
    out = tmp_path / "study"
    assert run_train("--preset", "smoke", "--out", str(out), "--seeds", "2", *TINY) == 0
    per_seed = [json.loads((out / f"seed{s}" / report.RESULTS_JSON).read_text()) for s in (0, 1)]
    study = json.loads((out / "study.json").read_text())
    assert [r["seed"] for r in per_seed] == [0, 1]
    one = next(r for r in study["paired"] if r["method"] == "rcfd" and r["steps"] == 1
               and r["extractor"] == "classifier" and r["reference"] == "test" and r["metric"] == "fid")
    fids = {m: [next(e["metrics"]["classifier"]["test"]["fid"] for e in r["entries"]
                     if (e["key"], e["steps"]) == (m, 1)) for r in per_seed] for m in ("rcfd", "pd")}
    assert one["diffs"] == pytest.approx([a - b for a, b in zip(fids["rcfd"], fids["pd"])])
    md = (out / "study.md").read_text()
    assert "no difference shown" in md or "better" in md or "worse" in md
    assert (out / "per_seed.csv").is_file()
    assert torch.is_tensor(load_model_file(out / "seed1" / "base" / "model.safetensors")["state_dict"]["head.weight"])


def _sharded_sampling(rank, world, ckpt, port, out):
    import os

    import torch.distributed as tdist

    from rcfd.distributed import DistInfo
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, info = load_diffusion_checkpoint(ckpt)
        images = sample_images(model, info, num_samples=7, num_steps=1, batch_size=2, seed=3,
                               dist=DistInfo(rank, world, rank, "gloo"), progress=False)
        torch.save(images, f"{out}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_evaluation_sampling_is_sharded_over_ranks(tiny_run, tmp_path):
    """Under torchrun each rank samples its block and rank 0 gathers all of them: the same
    images one process makes from the same seed."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_sampling, args=(2, str(tiny_run / "pd" / "T1.safetensors"), port, str(tmp_path)), nprocs=2)
    gathered, other = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert gathered.shape == (7, 1, 16, 16) and gathered.dtype == torch.uint8 and other is None
    assert not torch.equal(gathered[:3], gathered[4:])  # the ranks drew different noise
    model, info = load_diffusion_checkpoint(str(tiny_run / "pd" / "T1.safetensors"))
    alone = sample_images(model, info, num_samples=7, num_steps=1, batch_size=2, seed=3,
                          progress=False)
    torch.testing.assert_close(gathered, alone, rtol=0, atol=1)  # uint8: one level of rounding
