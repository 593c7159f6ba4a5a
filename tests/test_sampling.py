"""DDIM sampling: the eager sampler is its explicit steps, analytic denoisers give exact
answers, the CUDA-graph sampler equals the eager one (CUDA) or falls back to it (CPU)."""

import warnings

import pytest
import torch
from standins import GaussianDenoiser, TinyNet

from rcfd import sampling
from rcfd.distributed import DistInfo, shard_range
from rcfd.core.schedule import cosine_schedule, step_indices

F64 = torch.float64


def ref_step(model, z, t, s, sched, ts, clip=True):
    """METHOD.md "DDIM step" in float64, written out."""
    it, is_ = t * ts, s * ts
    x = model(z, torch.full((z.shape[0],), it)).double()
    x = x.clamp(-1, 1) if clip else x
    eps = (z.double() - sched.alpha[it] * x) / sched.sigma[it]
    return sched.alpha[is_] * x + sched.sigma[is_] * eps


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_eager_sampler_is_its_explicit_steps(num_steps):
    T, ts = 8, 4
    sched = cosine_schedule(T, ts)
    model = TinyNet(ch=3, width=8).eval()
    x_T = torch.randn(3, 3, 5, 7)
    got = sampling.sample_ddim(model, x_T, T, ts, num_steps)
    steps = step_indices(T, num_steps)
    z = x_T
    with torch.no_grad():
        for i in range(num_steps):
            z = sampling.ddim_step(model, z, steps[i], steps[i + 1], sched, ts)
    torch.testing.assert_close(got, z.clamp(-1, 1))


def test_ddim_step_matches_the_float64_formula():
    sched = cosine_schedule(16, 1)
    model = GaussianDenoiser(sched, torch.randn(1, 2, 3, 3, dtype=F64) * 2, 0.5)  # some |x0| > 1
    z = torch.randn(5, 2, 3, 3, dtype=F64)
    for clip in (True, False):
        got = sampling.ddim_step(model, z, 12, 4, sched, 1, clip=clip)
        torch.testing.assert_close(got, ref_step(model, z, 12, 4, sched, 1, clip))
    assert not torch.allclose(sampling.ddim_step(model, z, 12, 4, sched, 1, clip=True),
                              sampling.ddim_step(model, z, 12, 4, sched, 1, clip=False))


def test_ddim_step_with_per_sample_steps():
    sched = cosine_schedule(8, 2)
    model = GaussianDenoiser(sched, torch.randn(1, 1, 4, 3, dtype=F64) * 0.3, 0.7)
    z = torch.randn(4, 1, 4, 3, dtype=F64)
    t, s = torch.tensor([8, 5, 2, 1]), torch.tensor([6, 0, 1, 0])
    got = sampling.ddim_step(model, z, t, s, sched, 2, clip=False)
    for b in range(4):
        want = sampling.ddim_step(model, z[b:b + 1], int(t[b]), int(s[b]), sched, 2, clip=False)
        torch.testing.assert_close(got[b:b + 1], want)


def test_explicit_steps_equal_num_steps_and_allow_uneven_lists():
    T = 16
    model = GaussianDenoiser(cosine_schedule(T, 1), torch.zeros(1, 1, 3, 3, dtype=F64), 0.3)
    x_T = torch.randn(2, 1, 3, 3, dtype=F64)
    torch.testing.assert_close(sampling.sample_ddim(model, x_T, T, 1, 4),
                               sampling.sample_ddim(model, x_T, T, 1, steps=[16, 12, 8, 4, 0]))
    uneven = [16, 15, 9, 2, 0]
    z = x_T
    for t, s in zip(uneven, uneven[1:]):
        z = ref_step(model, z, t, s, cosine_schedule(T, 1), 1)
    torch.testing.assert_close(sampling.sample_ddim(model, x_T, T, 1, steps=uneven), z.clamp(-1, 1))


@pytest.mark.parametrize("num_steps", [1, 3, 12])
def test_exact_denoiser_of_a_point_is_exact_in_any_number_of_steps(num_steps):
    """Data = the point c: every step keeps z on ``alpha c + sigma eps`` with the noise
    ``eps`` of x_T, so z_0 = alpha_0 c + sigma_0 eps (index 0 is not noise-free)."""
    T, ts = 12, 2
    sched = cosine_schedule(T, ts)
    c = torch.rand(1, 3, 2, 5, dtype=F64) * 1.8 - 0.9
    x_T = torch.randn(4, 3, 2, 5, dtype=F64)
    eps = (x_T - sched.alpha[T * ts] * c) / sched.sigma[T * ts]
    want = (sched.alpha[0] * c + sched.sigma[0] * eps).clamp(-1, 1)
    got = sampling.sample_ddim(GaussianDenoiser(sched, c), x_T, T, ts, num_steps)
    torch.testing.assert_close(got, want)


def test_eps_prediction_samples_like_x0_prediction():
    T = 8
    sched = cosine_schedule(T, 1)
    mu = torch.randn(1, 2, 3, 3, dtype=F64) * 0.5
    x_T = torch.randn(3, 2, 3, 3, dtype=F64)
    a = sampling.sample_ddim(GaussianDenoiser(sched, mu, 0.2), x_T, T, 1, 4)
    b = sampling.sample_ddim(GaussianDenoiser(sched, mu, 0.2, "eps"), x_T, T, 1, 4,
                             prediction="eps")
    torch.testing.assert_close(a, b)


def test_bad_step_arguments_are_refused():
    model = TinyNet(ch=3, width=8).eval()
    x_T = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="exactly one"):
        sampling.sample_ddim(model, x_T, 8, 1, 2, steps=[8, 0])
    with pytest.raises(ValueError, match="decreasing"):
        sampling.sample_ddim(model, x_T, 8, 1, steps=[0, 8])
    with pytest.raises(ValueError, match="0..T"):
        sampling.sample_ddim(model, x_T, 8, 1, steps=[9, 0])
    with pytest.raises(ValueError, match="divide"):
        sampling.sample_ddim(model, x_T, 8, 1, 3)


def test_graph_sampler_falls_back_to_eager_on_cpu_and_warns_once():
    sampling._warn_eager.cache_clear()
    model = TinyNet(ch=3, width=8).eval()
    sampler = sampling.CUDAGraphSampler(model, 8, 2, 4)
    x_T = torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a, b = sampler(x_T), sampler(x_T)
    assert sum("eager" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(a, sampling.sample_ddim(model, x_T, 8, 2, 4))
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(sampler(x_T, num_steps=2), sampling.sample_ddim(model, x_T, 8, 2, 2))


def test_graph_sampler_needs_eval_mode():
    with pytest.raises(ValueError, match="eval"):
        sampling.CUDAGraphSampler(TinyNet(ch=3, width=8).train(), 8, 1, 2)


def test_generate_yields_n_reproducible_images():
    model = TinyNet(ch=3, width=8).eval()
    kw = dict(shape=(3, 4, 5), T=8, time_scale=1, num_steps=2, progress=False)
    a = list(sampling.generate(model, 7, 3, seed=5, **kw))
    b = list(sampling.generate(model, 7, 3, seed=5, **kw))
    c = list(sampling.generate(model, 7, 3, seed=6, **kw))
    assert [x.shape[0] for x in a] == [3, 3, 1]
    assert all(x.shape[1:] == (3, 4, 5) and x.abs().max() <= 1 for x in a)
    torch.testing.assert_close(torch.cat(a), torch.cat(b))
    assert not torch.allclose(torch.cat(a), torch.cat(c))
    g = torch.Generator().manual_seed(5)
    first = sampling.sample_ddim(model, torch.randn(3, 3, 4, 5, generator=g), 8, 1, 2)
    torch.testing.assert_close(torch.cat(a)[:3], first)


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 16, 16)], ids=str)
def test_noise_blocks_equal_one_process_noise_for_any_world_size(shape):
    """Each rank's block holds the noise one process draws for those samples, so the union
    over ranks is the same sample set for 1, 2, 3 or 4 processes (60 values per image
    included: not a multiple of the 16 that CPU randn fills at a time)."""
    n, batch = 23, 5

    def noise(indices=None):
        g = torch.Generator().manual_seed(11)
        return list(sampling.noise_batches(n, batch, shape, g, indices))

    whole = noise()
    assert [x.shape[0] for x in whole] == [5, 5, 5, 5, 3]
    for world in (1, 2, 3, 4):
        blocks = []
        for rank in range(world):
            block = shard_range(n, DistInfo(rank=rank, world_size=world))
            got = noise(block)
            sizes = [x.shape[0] for x in got]
            assert sum(sizes) == len(block) and all(s == batch for s in sizes[:-1])
            blocks += got
        assert torch.equal(torch.cat(blocks), torch.cat(whole)), f"world size {world}"


def test_noise_blocks_must_be_contiguous_and_inside():
    g = torch.Generator()
    for bad in (range(0, 10, 2), range(5, 11), range(-1, 3)):
        with pytest.raises(ValueError, match="contiguous block"):
            next(sampling.noise_batches(10, 4, (1, 2, 2), g, bad))
    assert list(sampling.noise_batches(10, 4, (1, 2, 2), g, range(3, 3))) == []


def test_generate_block_equals_its_slice_of_all():
    model = TinyNet(ch=3, width=8).eval()
    kw = dict(shape=(3, 4, 5), T=8, time_scale=1, num_steps=2, progress=False, seed=3)
    whole = torch.cat(list(sampling.generate(model, 9, 4, **kw)))
    part = torch.cat(list(sampling.generate(model, 9, 4, indices=range(2, 7), **kw)))
    torch.testing.assert_close(part, whole[2:7])


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_graph_sampler_equals_eager_on_cuda(prediction):
    model = TinyNet(ch=3).cuda().eval()
    sampler = sampling.CUDAGraphSampler(model, 16, 2, 4, prediction=prediction)
    for batch in (1, 5, 5, 33):
        x_T = torch.randn(batch, 3, 8, 8, device="cuda")
        want = sampling.sample_ddim(model, x_T, 16, 2, 4, prediction=prediction)
        torch.testing.assert_close(sampler(x_T), want, rtol=1e-5, atol=1e-5)
    x_T = torch.randn(5, 3, 8, 8, device="cuda")
    torch.testing.assert_close(sampler(x_T, num_steps=8),
                               sampling.sample_ddim(model, x_T, 16, 2, 8, prediction=prediction),
                               rtol=1e-5, atol=1e-5)
    assert len(sampler._graphs) == 4  # (1, 4), (5, 4), (33, 4), (5, 8): one graph each


@pytest.mark.cuda
def test_graph_sampler_sees_in_place_weight_updates_and_recaptures_reallocated_ones():
    model = TinyNet(ch=3).cuda().eval()
    sampler = sampling.CUDAGraphSampler(model, 8, 1, 2)
    x_T = torch.randn(4, 3, 8, 8, device="cuda")
    before = sampler(x_T)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    after = sampler(x_T)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, sampling.sample_ddim(model, x_T, 8, 1, 2),
                               rtol=1e-5, atol=1e-5)
    model.out.weight = torch.nn.Parameter(model.out.weight.detach().clone() * 0.5)
    torch.testing.assert_close(sampler(x_T), sampling.sample_ddim(model, x_T, 8, 1, 2),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_graph_sampler_bf16_autocast_matches_eager_bf16():
    model = TinyNet(ch=3).cuda().eval()
    sampler = sampling.CUDAGraphSampler(model, 8, 1, 4, autocast_dtype=torch.bfloat16)
    x_T = torch.randn(6, 3, 8, 8, device="cuda")
    got = sampler(x_T)
    assert got.dtype == torch.float32
    want = sampling.sample_ddim(model, x_T, 8, 1, 4, autocast_dtype=torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    fp32 = sampling.sample_ddim(model, x_T, 8, 1, 4)
    torch.testing.assert_close(got, fp32, rtol=5e-2, atol=5e-2)

