"""The k-diffusion adapter: sigma <-> schedule index, the denoiser's x0 in the
variance-exploding view, and Euler over our plan's sigmas is our DDIM (fp32, 1e-5), first
with a three-line Euler loop of our own (no k-diffusion needed), then with k-diffusion's."""

import pytest
import torch

import rcfd
from rcfd.core.schedule import cosine_schedule
from rcfd.core.unet import UNet, UNetConfig
from rcfd.io.checkpoint import DiffusionInfo, save_diffusion_checkpoint
from rcfd.interop.kdiffusion import KDenoiser, index_of, sigmas, to_images, ve_sigmas
from rcfd.samplers import ddim, make_plan

T, SCALE = 4, 16


def model(prediction="x0"):
    """A random small U-Net on ``T * SCALE + 1`` indices, with outputs large enough to clip."""
    config = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), attn=(), num_res_blocks=1,
                        dropout=0.0, num_time_indices=T * SCALE + 1)
    net = UNet(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    info = DiffusionInfo(T=T, time_scale=SCALE, prediction=prediction, config=config, source="rcfd",
                         weights="state_dict")
    return net, info


def euler(denoiser, x, s):
    """k-diffusion's ``sample_euler`` without churn, written out."""
    for i in range(len(s) - 1):
        d = denoiser(x, s[i].expand(x.shape[0]))
        x = x + (x - d) / s[i] * (s[i + 1] - s[i])
    return x


def test_sigmas_are_the_plans_in_the_ve_view():
    net, info = model()
    schedule = cosine_schedule(T, SCALE)
    plan = make_plan(schedule, T, SCALE, 2, dtype=torch.float64)
    s = sigmas(net, 2, info=info, dtype=torch.float64)
    torch.testing.assert_close(s, plan.sigma / plan.alpha, rtol=1e-12, atol=0)
    assert (s[:-1] > s[1:]).all() and s[-1] > 0.01  # index 0 is not noise-free
    z = sigmas(net, 2, info=info, append_zero=True)
    assert z.dtype == torch.float32 and z[-1] == 0 and len(z) == len(s) + 1


def test_index_of_inverts_the_table_and_takes_the_nearest():
    table = ve_sigmas(cosine_schedule(T, SCALE))
    k = torch.arange(len(table))
    assert torch.equal(index_of(table.float(), table), k)  # float32 rounding still maps back
    between = (table[3] * table[4]).sqrt()  # the geometric midpoint of indices 3 and 4
    assert index_of(torch.stack([between * 0.99, between * 1.01]), table).tolist() == [3, 4]
    assert index_of(torch.tensor([0.0, 1e9]), table).tolist() == [0, len(table) - 1]


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_the_denoiser_is_one_call_of_the_net_in_ve_coordinates(prediction):
    net, info = model(prediction)
    schedule = cosine_schedule(T, SCALE)
    k = torch.tensor([SCALE * T, 7])
    a, sig = schedule.alpha[k].float().view(-1, 1, 1, 1), schedule.sigma[k].float().view(-1, 1, 1, 1)
    z = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = net(z, k)
        x0 = {"x0": out, "eps": (z - sig * out) / a, "v": a * z - sig * out}[prediction]
        got = KDenoiser(net, info, clip=False)(z / a, (sig / a).flatten())
        clipped = KDenoiser(net, info)(z / a, (sig / a).flatten())
    torch.testing.assert_close(got, x0, rtol=1e-4, atol=1e-4)
    assert torch.equal(clipped, got.clamp(-1, 1)) and (got.abs() > 1).any()


@pytest.mark.parametrize("steps, prediction", [(1, "x0"), (2, "x0"), (4, "x0"), (4, "eps"), (2, "v")])
def test_euler_over_our_sigmas_is_our_ddim(steps, prediction):
    net, info = model(prediction)
    x_T = torch.randn(3, 1, 8, 8)
    plan = make_plan(None, T, SCALE, steps, prediction=prediction)
    s = sigmas(net, steps, info=info, dtype=torch.float64)
    with torch.no_grad():
        ours = ddim(net, x_T, plan)
        theirs = to_images(euler(KDenoiser(net, info), x_T.double() * s[0], s), s[-1])
        fp32 = to_images(euler(KDenoiser(net, info), x_T * s[0].float(), s.float()), s[-1])
    assert (ours.abs() == 1).any() and (ours.abs() < 1).any()  # clipping is exercised
    assert theirs.dtype == torch.float64
    torch.testing.assert_close(theirs.float(), ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(fp32, ours, rtol=0, atol=2e-3)  # the fp32 cancellation (module doc)


def test_an_api_model_is_taken_as_it_is(tmp_path):
    net, info = model()
    m = rcfd.load(save_diffusion_checkpoint(tmp_path / "m.pt", net, T=T, time_scale=SCALE), "cpu")
    torch.testing.assert_close(sigmas(m, 2), sigmas(net, 2, info=info))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(KDenoiser(m)(x, 3.0), KDenoiser(net, info)(x, 3.0))
    with pytest.raises(TypeError, match="network with its checkpoint info"):
        KDenoiser(net)


def test_k_diffusions_samplers_run_on_it():
    sampling = pytest.importorskip("k_diffusion.sampling")
    net, info = model()
    denoiser = KDenoiser(net, info)
    x_T = torch.randn(3, 1, 8, 8)
    s = sigmas(net, 4, info=info, dtype=torch.float64)
    with torch.no_grad():
        ours = ddim(net, x_T, make_plan(None, T, SCALE, 4))
        theirs = to_images(sampling.sample_euler(denoiser, x_T.double() * s[0], s, disable=True), s[-1])
        torch.testing.assert_close(theirs.float(), ours, rtol=0, atol=1e-5)
        zero = sigmas(net, 4, info=info, append_zero=True)
        for fn in (sampling.sample_heun, sampling.sample_dpmpp_2m):
            x = fn(denoiser, x_T * zero[0], zero, disable=True)
            assert x.shape == x_T.shape and torch.isfinite(x).all()
            assert x.abs().max() <= 1 + 1e-3  # the clipped clean estimate, up to fp32 rounding
