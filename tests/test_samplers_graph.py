"""The CUDA-graph capture of any sampler (equal to the eager one on CUDA, the eager one with
one warning on the CPU) and batched generation (reproducible, the same images for any
number of processes)."""

import warnings

import pytest
import torch
from standins import TinyNet

from rcfd import samplers
from rcfd.samplers import graph as graph_module

NAMES = tuple(samplers.SAMPLERS)


def plan_of(T, time_scale, num_steps, device="cpu", **kw):
    return samplers.make_plan(None, T, time_scale, num_steps, device=device, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_graph_sampler_falls_back_to_eager_on_cpu_and_warns_once(name):
    graph_module._warn_eager.cache_clear()
    model = TinyNet(ch=3, width=8).eval()
    sampler = samplers.GraphSampler(model, plan_of(8, 2, 4), name)
    x_T = torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a, b = sampler(x_T), sampler(x_T)
        two = sampler(x_T, plan_of(8, 2, 2))
    assert sum("eager" in str(w.message) for w in caught) == 1
    fn = samplers.get_sampler(name)
    torch.testing.assert_close(a, fn(model, x_T, plan_of(8, 2, 4)))
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(two, fn(model, x_T, plan_of(8, 2, 2)))
    assert sampler.num_graphs == 0


def test_graph_sampler_needs_eval_mode_and_a_plan():
    with pytest.raises(ValueError, match="eval"):
        samplers.GraphSampler(TinyNet(ch=3, width=8).train(), plan_of(8, 1, 2))
    model = TinyNet(ch=3, width=8).eval()
    sampler = samplers.GraphSampler(model, plan_of(8, 1, 2))
    model.train()
    with pytest.raises(ValueError, match="eval"):
        sampler(torch.randn(1, 3, 4, 4))
    with pytest.raises(TypeError, match="make_plan"):
        samplers.GraphSampler(model.eval(), 2)
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.GraphSampler(model, plan_of(8, 1, 2), "heun")
    with pytest.raises(ValueError, match="autocast_dtype"):
        samplers.GraphSampler(model, plan_of(8, 1, 2), autocast_dtype=torch.float64)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", NAMES)
def test_generate_yields_n_reproducible_images(name):
    model = TinyNet(ch=3, width=8).eval()
    plan = plan_of(8, 1, 2)
    kw = dict(shape=(3, 4, 5), plan=plan, sampler=name, progress=False)
    a = list(samplers.generate(model, 7, 3, seed=5, **kw))
    b = list(samplers.generate(model, 7, 3, seed=5, **kw))
    c = list(samplers.generate(model, 7, 3, seed=6, **kw))
    assert [x.shape[0] for x in a] == [3, 3, 1]
    assert all(x.shape[1:] == (3, 4, 5) and x.abs().max() <= 1 for x in a)
    torch.testing.assert_close(torch.cat(a), torch.cat(b))
    assert not torch.allclose(torch.cat(a), torch.cat(c))
    first_noise = torch.randn(3, 3, 4, 5, generator=torch.Generator().manual_seed(
        samplers.batch_seed(5, 0)))  # batch 0 starts from its own seeded noise
    first = samplers.get_sampler(name)(model, first_noise, plan)
    torch.testing.assert_close(a[0], first)


def test_generate_labels_its_progress_bar_with_the_sampler(capsys):
    model = TinyNet(ch=3, width=8).eval()
    list(samplers.generate(model, 2, 2, shape=(3, 4, 4), plan=plan_of(8, 1, 2),
                           sampler="dpm-solver", progress=True))
    assert "2-step dpm-solver" in capsys.readouterr().err


def test_generate_refuses_bad_sizes_names_and_dtypes():
    model = TinyNet(ch=3, width=8).eval()
    with pytest.raises(ValueError, match="positive"):
        next(samplers.generate(model, 0, 2, shape=(3, 4, 4), plan=plan_of(8, 1, 2)))
    with pytest.raises(ValueError, match="unknown sampler"):
        next(samplers.generate(model, 2, 2, shape=(3, 4, 4), plan=plan_of(8, 1, 2), sampler="ddpm"))
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of fp32, bf16, fp16"):
        next(samplers.generate(model, 2, 2, shape=(3, 4, 4), plan=plan_of(8, 1, 2), dtype="int8"))


def test_sampling_dtype_is_bf16_on_cuda_by_default():
    assert samplers.sampling_dtype("auto", "cuda") == "bf16"
    assert samplers.sampling_dtype("auto", "cpu") == "fp32"
    assert samplers.sampling_dtype("fp32", "cuda") == "fp32"


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 16, 16)], ids=str)
def test_noise_blocks_equal_one_process_noise_for_any_world_size(shape):
    """Each rank's block of whole batches holds the noise one process draws for those
    batches, so the union over ranks is the same sample set for 1, 2, 3 or 4 processes (and
    a rank draws only its own noise)."""
    n, batch = 23, 5
    whole = list(samplers.noise_batches(n, batch, shape, seed=11))
    assert [x.shape[0] for x in whole] == [5, 5, 5, 5, 3]
    for world in (1, 2, 3, 4, 6):
        blocks = [samplers.shard_batches(n, batch, rank, world) for rank in range(world)]
        assert [i for b in blocks for i in b] == list(range(n))  # they tile the samples
        got = [x for b in blocks for x in samplers.noise_batches(n, batch, shape, 11, "cpu", b)]
        assert torch.equal(torch.cat(got), torch.cat(whole)), f"world size {world}"


def test_noise_blocks_must_be_whole_batches_inside():
    for bad in (range(0, 10, 2), range(5, 10), range(4, 11), range(-4, 4), range(0, 6)):
        with pytest.raises(ValueError, match="block of whole batches"):
            next(samplers.noise_batches(10, 4, (1, 2, 2), 0, "cpu", bad))
    assert list(samplers.noise_batches(10, 4, (1, 2, 2), 0, "cpu", range(8, 8))) == []
    assert [x.shape[0] for x in samplers.noise_batches(10, 4, (1, 2, 2), 0, "cpu", range(4, 10))] == [4, 2]


def test_generate_block_equals_its_slice_of_all():
    model = TinyNet(ch=3, width=8).eval()
    kw = dict(shape=(3, 4, 5), plan=plan_of(8, 1, 2), sampler="pndm", progress=False, seed=3)
    whole = torch.cat(list(samplers.generate(model, 9, 4, **kw)))
    part = torch.cat(list(samplers.generate(model, 9, 4, indices=range(4, 9), **kw)))
    torch.testing.assert_close(part, whole[4:9])


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("prediction", ["x0", "eps"])
@pytest.mark.parametrize("name", NAMES)
def test_graph_sampler_equals_eager_on_cuda(name, prediction):
    model = TinyNet(ch=3).cuda().eval()
    fn = samplers.get_sampler(name)
    plan4 = plan_of(16, 2, 4, "cuda", prediction=prediction)
    sampler = samplers.GraphSampler(model, plan4, name)
    for batch in (1, 5, 5, 33):
        x_T = torch.randn(batch, 3, 8, 8, device="cuda")
        torch.testing.assert_close(sampler(x_T), fn(model, x_T, plan4), rtol=1e-5, atol=1e-5)
    x_T = torch.randn(5, 3, 8, 8, device="cuda")
    plan8 = plan_of(16, 2, 8, prediction=prediction)  # a CPU plan: moved into the graph's copy
    torch.testing.assert_close(sampler(x_T, plan8), fn(model, x_T, plan8.to("cuda")),
                               rtol=1e-5, atol=1e-5)
    sampler(x_T, plan_of(16, 2, 8, prediction=prediction))  # an equal plan: no new graph
    assert sampler.num_graphs == 4  # (1, 4), (5, 4), (33, 4), (5, 8): one graph each


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_graph_sampler_sees_in_place_weight_updates_and_recaptures_reallocated_ones(name):
    model = TinyNet(ch=3).cuda().eval()
    plan = plan_of(8, 1, 4, "cuda")
    fn = samplers.get_sampler(name)
    sampler = samplers.GraphSampler(model, plan, name)
    x_T = torch.randn(4, 3, 8, 8, device="cuda")
    before = sampler(x_T)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    after = sampler(x_T)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fn(model, x_T, plan), rtol=1e-5, atol=1e-5)
    model.out.weight = torch.nn.Parameter(model.out.weight.detach().clone() * 0.5)
    torch.testing.assert_close(sampler(x_T), fn(model, x_T, plan), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_graph_sampler_bf16_autocast_matches_eager_bf16(name):
    model = TinyNet(ch=3).cuda().eval()
    plan = plan_of(8, 1, 4, "cuda")
    sampler = samplers.GraphSampler(model, plan, name, autocast_dtype=torch.bfloat16)
    x_T = torch.randn(6, 3, 8, 8, device="cuda")
    got = sampler(x_T)
    assert got.dtype == torch.float32
    want = samplers.sample(model, x_T, plan, name, autocast_dtype=torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    fp32 = samplers.get_sampler(name)(model, x_T, plan)
    torch.testing.assert_close(got, fp32, rtol=5e-2, atol=5e-2)


@pytest.mark.cuda
def test_generate_on_cuda_draws_its_noise_there_and_reproduces():
    """On CUDA the noise comes from a CUDA generator per batch: the same seed gives the same
    images run to run (fp32 here), and no host sync is needed per batch."""
    model = TinyNet(ch=3, width=8).eval().cuda()
    kw = dict(shape=(3, 8, 8), plan=plan_of(8, 1, 4), sampler="dpm-solver", progress=False,
              seed=2, device="cuda", dtype="fp32")
    a = torch.cat(list(samplers.generate(model, 6, 4, **kw)))
    b = torch.cat(list(samplers.generate(model, 6, 4, **kw)))
    assert a.device.type == "cuda"
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    noise = next(samplers.noise_batches(6, 4, (3, 8, 8), 2, "cuda"))
    assert noise.device.type == "cuda"


def test_consistency_graph_inputs_are_the_eager_default_noise():
    """What GraphSampler draws outside its capture for the consistency sampler is exactly
    the noise the eager sampler draws by default, so the captured images are the eager ones;
    one step draws nothing."""
    from rcfd.samplers.consistency import graph_inputs

    fn = samplers.get_sampler("consistency")
    assert fn.graph_inputs is graph_inputs
    model = TinyNet(ch=3, width=8).eval()
    x_T = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    for K in (2, 4):
        plan = plan_of(8, 2, K)
        extra = graph_inputs(x_T, plan)
        assert len(extra["noise"]) == K - 1
        assert torch.equal(fn(model, x_T, plan, **graph_inputs(x_T, plan)), fn(model, x_T, plan))
        other = graph_inputs(x_T + 1e-3, plan)["noise"][0]
        assert (other - extra["noise"][0]).abs().max() > 0.1
    assert graph_inputs(x_T, plan_of(8, 2, 1)) == {"noise": []}
    static = graph_module._clone_inputs(extra)
    graph_module._copy_inputs(static, graph_inputs(x_T * 2, plan_of(8, 2, 4)))
    assert all(torch.equal(a, b) for a, b in
               zip(static["noise"], graph_inputs(x_T * 2, plan_of(8, 2, 4))["noise"]))


@pytest.mark.cuda
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_consistency_is_captured_with_its_eager_noise(steps):
    model = TinyNet(ch=3).cuda().eval()
    plan = plan_of(16, 2, steps, "cuda")
    sampler = samplers.GraphSampler(model, plan, "consistency")
    fn = samplers.get_sampler("consistency")
    outs = []
    for batch in (5, 5, 7):
        x_T = torch.randn(batch, 3, 8, 8, device="cuda")
        outs.append(sampler(x_T))
        torch.testing.assert_close(outs[-1], fn(model, x_T, plan), rtol=1e-5, atol=1e-5)
    assert sampler.fell_back is None and sampler.num_graphs == 2  # batch 5 replayed
    assert not torch.equal(outs[0], outs[1])
