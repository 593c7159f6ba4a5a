"""A diffusers model folder as a teacher and as an input (rcfd.interop.diffusers_load): its
schedule agrees with diffusers' alphas_cumprod at every integer timestep, a DDIM step from
our plan equals diffusers' DDIMScheduler.step, its network equals UNet2DModel at the grid's
(fractional) timesteps, predictions convert (x0 / eps / v), eps teachers get v students, and
bad folders are refused in one line. Random small models saved with save_pretrained."""

import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rcfd.api.model as api
from rcfd.cli import evaluate as evaluate_cli, sample as sample_cli, train
from rcfd.core.schedule import (
    cosine_schedule,
    grid_timestep,
    interpolated_abar,
    outputs_to_x0_eps,
    prediction_target,
    schedule_from_spec,
)
from rcfd.errors import CheckpointError, UsageError
from rcfd.interop.diffusers_load import DEFAULT_GRID, betas_of, read_diffusers_config
from rcfd.io.checkpoint import load_diffusion_checkpoint
from rcfd.losses import PDLoss, pd_target
from rcfd.methods.distill import student_from, student_prediction
from rcfd.samplers import ddim, make_plan
from rcfd.training.rundir import checkpoint_path
from standins import GaussianDenoiser
from test_cli_errors import one_line_error

diffusers = pytest.importorskip("diffusers")
F64 = torch.float64
SMALL = dict(in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
             norm_num_groups=8)
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def save_teacher(folder: Path, *, size=8, prediction_type="epsilon", beta_schedule="linear",
                 num_train_timesteps=1000, scheduler="DDPMScheduler", seed=0) -> Path:
    """A random small UNet2DModel and its scheduler, saved as a pipeline folder."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=size, **SMALL)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cls = getattr(diffusers, scheduler)
    cls(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
        prediction_type=prediction_type).save_pretrained(folder / "scheduler")
    unet.save_pretrained(folder / "unet")
    return folder


def their_abar(folder: Path) -> torch.Tensor:
    return diffusers.DDPMScheduler.from_pretrained(folder / "scheduler").alphas_cumprod.to(F64)


# --------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("prediction_type", list(PREDICTIONS))
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_the_schedule_is_the_teachers_at_every_integer_timestep(tmp_path, prediction_type,
                                                                beta_schedule):
    folder = save_teacher(tmp_path / "t", prediction_type=prediction_type, beta_schedule=beta_schedule)
    model = api.load(folder, "cpu")
    info, theirs = model.info, their_abar(folder)
    assert (info.T, info.time_scale, info.prediction) == (DEFAULT_GRID, 1, PREDICTIONS[prediction_type])
    assert info.source == "diffusers" and info.noise_schedule["grid"] == DEFAULT_GRID
    abar = torch.tensor(info.noise_schedule["alphas_cumprod"], dtype=F64)
    ours = interpolated_abar(abar, torch.arange(1000, dtype=F64))
    torch.testing.assert_close(ours.sqrt(), theirs.sqrt(), rtol=0, atol=1e-6)
    torch.testing.assert_close((1 - ours).sqrt(), (1 - theirs).sqrt(), rtol=0, atol=1e-6)
    # the grid's ends are integer timesteps 0 and 999: exact there
    assert model.schedule.alpha[0] ** 2 == pytest.approx(float(theirs[0]), abs=1e-15)
    assert model.schedule.alpha[-1] ** 2 == pytest.approx(float(theirs[-1]), abs=1e-15)
    # in between: monotone, and between the neighbouring integer timesteps
    tau = grid_timestep(torch.arange(DEFAULT_GRID + 1), 1000, DEFAULT_GRID)
    table = model.schedule.alpha ** 2
    assert (table[1:] < table[:-1]).all()
    lo, hi = theirs[tau.floor().long()], theirs[tau.ceil().long()]
    assert ((table <= lo + 1e-15) & (table >= hi - 1e-15)).all()


def test_the_betas_are_diffusers_own_and_close_to_the_float64_formulas():
    """float32 as diffusers computes them (that is what the teacher was trained on), and
    within float32 rounding of the same formulas in float64."""
    n = 1000
    lin = torch.linspace(1e-4, 0.02, n, dtype=F64)
    cos = torch.tensor([min(1 - math.cos(((i + 1) / n + 0.008) / 1.008 * math.pi / 2) ** 2
                            / math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2, 0.999)
                        for i in range(n)], dtype=F64)
    for kind, want in (("linear", lin), ("squaredcos_cap_v2", cos),
                       ("scaled_linear", torch.linspace(1e-4 ** 0.5, 0.02 ** 0.5, n, dtype=F64) ** 2)):
        got = betas_of({"beta_schedule": kind}, n, "test")
        assert got.dtype == torch.float32
        ours, exact = torch.cumprod(1 - got.to(F64), 0), torch.cumprod(1 - want, 0)
        torch.testing.assert_close(ours, exact, rtol=1e-4, atol=0)
        torch.testing.assert_close(ours.sqrt(), exact.sqrt(), rtol=0, atol=1e-6)
        torch.testing.assert_close((1 - ours).sqrt(), (1 - exact).sqrt(), rtol=0, atol=1e-6)


def test_interpolation_is_linear_in_log_snr_between_timesteps():
    abar = torch.tensor([0.9, 0.5, 0.1], dtype=F64)
    logsnr = torch.log(abar / (1 - abar))
    got = interpolated_abar(abar, torch.tensor([0.0, 0.25, 1.0, 1.5, 2.0], dtype=F64))
    want = torch.sigmoid(torch.stack([logsnr[0], 0.75 * logsnr[0] + 0.25 * logsnr[1], logsnr[1],
                                      0.5 * logsnr[1] + 0.5 * logsnr[2], logsnr[2]]))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert got[0] == abar[0] and got[2] == abar[1] and got[4] == abar[2]  # exact, bit for bit


def test_cosine_stays_the_default_schedule():
    for spec in (None, {"kind": "cosine"}):
        s = schedule_from_spec(spec, 8, 4)
        assert torch.equal(s.alpha, cosine_schedule(8, 4).alpha)


# --------------------------------------------------------------------------- the network and DDIM


def test_loading_a_folder_needs_neither_diffusers_nor_the_safetensors_package(tmp_path):
    folder = save_teacher(tmp_path / "t")
    code = ("import sys; sys.modules['diffusers'] = sys.modules['safetensors'] = None; "
            "import rcfd; "
            f"m = rcfd.load({str(folder)!r}, 'cpu'); print(m.info.T, m.info.prediction)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0 and r.stdout.split() == ["1024", "eps"], r.stderr


def test_the_network_is_unet2dmodel_at_the_grids_timesteps(tmp_path):
    folder = save_teacher(tmp_path / "t")
    model = api.load(folder, "cpu")
    theirs = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    x = torch.randn(3, 1, 8, 8)
    i = torch.tensor([0, 517, 1024])
    with torch.no_grad():
        ours, want = model.net(x, i), theirs(x, i * 999 / 1024).sample
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)


def _ddim_step(folder, prediction_type, num_inference_steps):
    """diffusers' DDIMScheduler on the teacher's betas, trailing timesteps, no clipping."""
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    s = diffusers.DDIMScheduler(num_train_timesteps=cfg["num_train_timesteps"],
                                beta_schedule=cfg["beta_schedule"], prediction_type=prediction_type,
                                clip_sample=False, set_alpha_to_one=False,
                                timestep_spacing="trailing")
    s.set_timesteps(num_inference_steps)
    return s


@pytest.mark.parametrize("prediction_type", list(PREDICTIONS))
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("n_train, steps", [(1000, [1024, 0]), (1025, [1024, 512, 0])])
def test_a_ddim_step_of_our_plan_is_diffusers_step(tmp_path, prediction_type, beta_schedule,
                                                   n_train, steps):
    """1000 timesteps: one step 999 -> 0 (the grid's ends); 1025 timesteps: our index is the
    timestep itself, two steps 1024 -> 512 -> 0. The same model output goes into both."""
    folder = save_teacher(tmp_path / "t", prediction_type=prediction_type,
                          beta_schedule=beta_schedule, num_train_timesteps=n_train)
    model = api.load(folder, "cpu")
    plan = model.plan(steps, clip=False)
    scheduler = _ddim_step(folder, prediction_type, len(steps) - 1)
    taus = grid_timestep(plan.t_index, n_train, 1024).tolist()
    assert all(t == round(t) for t in taus)  # integer timesteps, where the tables are exact
    # diffusers' previous timestep is t - n_train // n (its fixed stride); with these n it is
    # our next step (-1 for the last: alphas_cumprod[0], our index 0, set_alpha_to_one=False)
    stride = n_train // (len(steps) - 1)
    assert [t - stride for t in taus[:-1]] == taus[1:-1] + [taus[-1] - (1 if n_train == 1000 else 0)]
    torch.manual_seed(1)
    outs = [torch.randn(2, 1, 8, 8) for _ in steps[:-1]]
    calls = iter(outs)
    x_T = torch.randn(2, 1, 8, 8)
    ours = ddim(lambda z, t: next(calls), x_T, plan)
    x = x_T.clone()
    for out, t in zip(outs, taus[:-1]):
        x = scheduler.step(out, int(t), x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- predictions


def test_x0_eps_v_conversions_in_float64():
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 2, 3, 3, dtype=F64), torch.randn(4, 2, 3, 3, dtype=F64)
    abar = torch.tensor([0.999, 0.6, 0.1, 1e-5], dtype=F64)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    view = (-1, 1, 1, 1)
    z = a.view(view) * x0 + s.view(view) * eps
    for prediction in ("x0", "eps", "v"):
        out = prediction_target(x0, eps, a, s, prediction)
        got_x0, got_eps = outputs_to_x0_eps(out, z, a, s, prediction)
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-9 if prediction != "eps" else 1e-6)
        torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-9)
    v = prediction_target(x0, eps, a, s, "v")
    torch.testing.assert_close(v, a.view(view) * eps - s.view(view) * x0, rtol=0, atol=0)


def test_students_of_an_eps_teacher_predict_v():
    assert student_prediction(None, "eps") == "v"
    assert student_prediction(None, "x0") == "x0"  # ours: unchanged, so are the default numbers
    assert student_prediction(None, "v") == "v"
    assert student_prediction("x0", "eps") == "x0"


def test_an_eps_teachers_v_student_target_and_one_step_sample(tmp_path):
    """The PD target does not depend on how teacher or student are parameterised; a v
    student initialised from an eps teacher samples finite images at one step, where the
    eps reading of the same network divides by alpha ~ 0.006."""
    sched = cosine_schedule(8, 1)
    mu = 0.3 * torch.randn(1, 1, 4, 4, dtype=F64)
    z = torch.randn(5, 1, 4, 4, dtype=F64)
    t = torch.tensor([2, 4, 6, 8, 8])
    x_ref, e_ref = pd_target(GaussianDenoiser(sched, mu, 0.2), z, t, sched, 1, "x0")
    x_eps, e_eps = pd_target(GaussianDenoiser(sched, mu, 0.2, "eps"), z, t, sched, 1, "eps")
    torch.testing.assert_close(x_eps, x_ref)
    torch.testing.assert_close(e_eps, e_ref)
    loss = PDLoss(GaussianDenoiser(sched, mu, 0.2, "eps"), sched, 8, 1, "both", "eps", "v")
    x0 = torch.randn(5, 1, 4, 4, dtype=F64)
    noise = torch.randn(5, 1, 4, 4, dtype=F64)
    # a v student that outputs exactly the v of the target has zero loss
    out = loss(lambda zz, idx: prediction_target(*pd_target(loss.teacher, zz, t, sched, 1, "eps"),
                                                 sched.alpha[idx], sched.sigma[idx], "v"),
               x0, t, noise)
    assert float(out.loss) < 1e-20
    torch.testing.assert_close(out.x0_hat, out.x_target)

    folder = save_teacher(tmp_path / "t", prediction_type="epsilon")
    net, info = load_diffusion_checkpoint(folder, diffusers_T=1)
    assert (info.T, info.time_scale, info.prediction) == (1, 1024, "eps")
    student = student_from(net, info, 0.0).eval()
    x_T = torch.randn(16, 1, 8, 8) * 3
    plan_v = make_plan(api.schedule_of(info), 1, 1024, 1, prediction="v", clip=False)
    plan_eps = make_plan(api.schedule_of(info), 1, 1024, 1, prediction="eps", clip=False)
    with torch.no_grad():
        v_images, eps_images = ddim(student, x_T, plan_v), ddim(student, x_T, plan_eps)
    assert torch.isfinite(v_images).all() and v_images.abs().max() < 10
    assert eps_images.abs().max() > 10 * v_images.abs().max()


# --------------------------------------------------------------------------- errors


def _bad_folder(tmp_path, change_unet=None, change_scheduler=None):
    folder = save_teacher(tmp_path / "t")
    for rel, change in (("unet/config.json", change_unet),
                        ("scheduler/scheduler_config.json", change_scheduler)):
        if change:
            path = folder / rel
            path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return folder


@pytest.mark.parametrize("unet, scheduler, needle", [
    (None, {"_class_name": "PNDMScheduler"}, "DDPMScheduler, DDIMScheduler"),
    (None, {"beta_schedule": "sigmoid"}, "linear, scaled_linear, squaredcos_cap_v2"),
    (None, {"prediction_type": "flow"}, "epsilon, sample, v_prediction"),
    (None, {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    (None, {"num_train_timesteps": 10 ** 9}, "num_train_timesteps"),
    ({"sample_size": 10 ** 6}, None, "out of range"),
    ({"block_out_channels": [2 ** 20, 2 ** 21]}, None, "out of range"),
    ({"_class_name": "UNet2DConditionModel"}, None, "only UNet2DModel"),
    ({"block_out_channels": ["wide", "wider"]}, None, "(unet)"),
    ({"layers_per_block": "two"}, None, "(unet)"),
])
def test_unsupported_folders_are_refused_by_name(tmp_path, unet, scheduler, needle):
    folder = _bad_folder(tmp_path, unet, scheduler)
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        read_diffusers_config(folder)


def test_a_folder_that_is_not_a_diffusers_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        api.load(tmp_path / "empty", "cpu")
    out = tmp_path / "x.png"
    one_line_error(capsys, sample_cli.main([str(tmp_path / "empty"), "--out", str(out),
                                            "--device", "cpu"]), 2, "not a diffusers model")
    assert not out.exists()
    folder = _bad_folder(tmp_path, None, {"_class_name": "EulerDiscreteScheduler"})
    one_line_error(capsys, evaluate_cli.main([str(folder), "--device", "cpu"]), 2, "DDPMScheduler")


def test_a_teacher_for_other_images_is_refused(tmp_path, capsys):
    """An 8x8 teacher for the 16x16 digits of the smoke preset: one line, nothing trained."""
    folder = save_teacher(tmp_path / "t", size=8)
    run = tmp_path / "run"
    one_line_error(capsys, train.main(["pd", "--preset", "smoke", "--set", f"pd.teacher={folder}",
                                       "--set", "pd.teacher_T=4", "--out", str(run), "--threads",
                                       "1", "--no-progress"]), 2, "8x8", "16x16")
    assert not (run / "pd").exists() or not any((run / "pd").iterdir())
    one_line_error(capsys, train.main(["pd", "--preset", "smoke", "--set", "pd.teacher_T=5",
                                       "--dry-run"]), 2, "teacher_T")


def test_dry_run_says_what_the_teacher_resolved_to(tmp_path, capsys):
    folder = save_teacher(tmp_path / "t", size=16)
    assert train.main(["pd", "--preset", "smoke", "--set", f"pd.teacher={folder}",
                       "--set", "pd.teacher_T=64", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "pd: 64 -> 1: 6 rounds" in err
    assert "diffusers folder, T=64 (time_scale 16), prediction eps -> students v" in err
    assert "DDPMScheduler linear, 1000 timesteps on a grid of 1024" in err


def test_rcfd_and_cd_take_a_diffusers_teacher_too(tmp_path, capsys):
    folder = save_teacher(tmp_path / "t", size=16, prediction_type="v_prediction")
    assert train.main(["--preset", "smoke", "--set", f"rcfd.teacher={folder}",
                       "--set", f"cd.teacher={folder}", "--set", "cd.student_prediction=x0",
                       "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "rcfd: 8 -> 1: 3 rounds" in err and "T=8 (time_scale 128), prediction v -> students v" in err
    assert "T=1024 (time_scale 1), prediction v -> students x0" in err


# --------------------------------------------------------------------------- end to end


def _cli(*argv):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.slow
def test_a_diffusers_ddpm_teacher_distills_to_one_step_end_to_end(tmp_path):
    """A random epsilon / linear / 1000-step DDPM teacher -> pd rounds 4 -> 2 -> 1 (smoke
    preset) -> rcfd.sample and rcfd.evaluate read the students -> the exported diffusers
    student samples rcfd.sample's images from the same noise (fp32, 1e-4)."""
    folder = save_teacher(tmp_path / "teacher", size=16)
    run = tmp_path / "run"
    r = _cli("rcfd.train", "pd", "--preset", "smoke", "--set", f"pd.teacher={folder}",
             "--set", "pd.teacher_T=4", "--out", str(run), "--threads", "1", "--no-progress",
             "--device", "cpu")
    assert r.returncode == 0, r.stderr
    student = checkpoint_path(run, "pd", "T1")
    _, info = load_diffusion_checkpoint(student)
    assert (info.T, info.time_scale, info.prediction) == (1, 1024, "v")
    assert info.noise_schedule["alphas_cumprod"] == pytest.approx(their_abar(folder).tolist(), abs=0)
    assert info.extra["teacher"] == str(checkpoint_path(run, "pd", "T2"))
    npz = tmp_path / "s.npz"
    r = _cli("rcfd.sample", str(student), "--steps", "1", "--num", "4", "--out", str(npz),
             "--device", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "prediction v, schedule diffusers DDPMScheduler linear" in r.stdout
    r = _cli("rcfd.evaluate", str(checkpoint_path(run, "pd", "T2")), "--steps", "2", "--num-samples", "32",
             "--extractor", "pixels", "--device", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "exported"
    r = _cli("rcfd.export", str(student), out, "--to", "diffusers", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    model = api.load(student, "cpu")
    noise = torch.randn(4, 1, 16, 16)
    ours = model.sample(4, steps=1, noise=noise, dtype="fp32")
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(out / "scheduler")
    scheduler.set_timesteps(1)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(x.clamp(-1, 1), ours, rtol=0, atol=1e-4)
    with np.load(npz) as f:  # rcfd.sample's images are the model's, from its seeded noise
        assert f[f.files[0]].shape[0] == 4
