"""A student exported to diffusers loads with from_pretrained, and the plain DDIMScheduler
loop from a given x_T equals our DDIM sampler (fp32, 1e-5) in the student's steps; the
schedule goes in by table; bad targets are refused and nothing is written."""

import pytest
import torch

from rcfd.core.schedule import cosine_schedule
from rcfd.core.unet import UNet, UNetConfig
from rcfd.errors import ConfigError, UsageError
from rcfd.interop.diffusers_export import betas_for_alphas_cumprod, export_diffusers
from rcfd.io.checkpoint import DiffusionInfo, load_diffusion_checkpoint, save_diffusion_checkpoint
from rcfd.samplers import ddim, make_plan

diffusers = pytest.importorskip("diffusers")
GRID = 1024


def student(scale=1.0, **overrides):
    """A random small U-Net whose x0 predictions are large enough that clipping matters."""
    config = UNetConfig.digits(ch_mult=(1, 2), num_time_indices=GRID + 1, dropout=0.0,
                               time_input_scale=scale, **overrides)
    model = UNet(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def info_of(model, T, prediction="x0"):
    return DiffusionInfo(T=T, time_scale=GRID // T, prediction=prediction, config=model.config,
                         source="rcfd", weights="state_dict")


def diffusers_loop(folder, x, T):
    """The documented three-line loop, on the exported folder."""
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(T)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, use_clipped_model_output=True).prev_sample
    return x.clamp(-1, 1), scheduler


@pytest.mark.parametrize("T, prediction", [(1, "x0"), (2, "x0"), (2, "eps"), (4, "x0")])
@pytest.mark.parametrize("scale", [1.0, 999 / GRID], ids=["positional", "learned"])
def test_the_exported_student_samples_as_our_ddim(tmp_path, T, prediction, scale):
    model = student(scale)
    info = info_of(model, T, prediction)
    folder = export_diffusers(model, info, tmp_path / "student")
    x_T = torch.randn(3, 1, 16, 16)
    plan = make_plan(None, T, info.time_scale, T, prediction=prediction)
    with torch.no_grad():
        ours = ddim(model, x_T, plan)
    theirs, scheduler = diffusers_loop(folder, x_T.clone(), T)
    assert scheduler.timesteps.tolist() == plan.t_index[:-1].tolist()  # our steps, no stride
    assert (ours.abs() == 1).any() and (ours.abs() < 1).any()  # clipping is exercised
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_a_saved_checkpoint_exports_and_the_pipeline_folder_loads(tmp_path):
    model = student()
    path = save_diffusion_checkpoint(tmp_path / "T2.pt", model, T=2, time_scale=GRID // 2)
    loaded, info = load_diffusion_checkpoint(path)
    folder = export_diffusers(loaded, info, tmp_path / "out")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors"]
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "DDIMPipeline"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_the_schedule_goes_in_by_table():
    schedule = cosine_schedule(1, GRID)
    abar = schedule.alpha.double() ** 2
    betas = torch.tensor(betas_for_alphas_cumprod(abar), dtype=torch.float32)
    theirs = torch.cumprod(1.0 - betas, dim=0).double()  # as DDIMScheduler builds it
    rel = ((theirs - abar) / abar).abs()
    plain = torch.cat([1 - abar[:1], 1 - abar[1:] / abar[:-1]]).float()  # betas rounded alone
    plain_rel = ((torch.cumprod(1.0 - plain, dim=0).double() - abar) / abar).abs()
    # about one float32 rounding per index, not accumulated (the last index, at
    # beta ~ 0.999, is limited by float32 betas either way)
    assert rel[:-1].max() < 2e-7 < plain_rel[:-1].max() and rel.max() < 2e-5


def test_a_given_schedule_is_exported(tmp_path):
    model = student()
    info = info_of(model, 2)
    other = cosine_schedule(1, GRID)._replace(alpha=cosine_schedule(1, GRID).alpha * 0.99)
    folder = export_diffusers(model, info, tmp_path / "s", schedule=other)
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), other.alpha ** 2,
                               rtol=2e-5, atol=0)


def test_bad_targets_are_refused_and_nothing_is_written(tmp_path):
    model = student()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="not an empty folder"):
        export_diffusers(model, info_of(model, 2), busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    conditional = student(num_classes=3)
    with pytest.raises(ConfigError, match="class-conditional"):
        export_diffusers(conditional, info_of(conditional, 2), tmp_path / "c")
    with pytest.raises(ConfigError, match="prediction"):
        export_diffusers(model, info_of(model, 2, prediction="score"), tmp_path / "p")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
