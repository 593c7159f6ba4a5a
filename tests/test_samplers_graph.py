"""The CUDA-graph capture of any sampler (equal to the eager one on CUDA, the eager one with
one warning on the CPU) and batched generation (reproducible; image i's noise the same for
any batch size, number of samples and number of processes)."""

import importlib
import os
import socket
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from standins import TinyNet

from rcfd import samplers
from rcfd.distributed import DistInfo
from rcfd.evaluation.measure import sample_images
from rcfd.samplers import graph as graph_module

generate_module = importlib.import_module("rcfd.samplers.generate")  # the name is the function's

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
    first = samplers.get_sampler(name)(model, chunk_rows(0, 5, 3, (3, 4, 5)), plan,
                                       **fresh_inputs(name, plan, 0, 5, 3, (3, 4, 5)))
    torch.testing.assert_close(a[0], first)  # image i: row i of chunk 0 of each stream


def chunk_rows(c, seed, rows, per_image, stream=generate_module.X_T_STREAM):
    """The first ``rows`` rows of chunk ``c`` of a noise stream, drawn here by hand."""
    g = torch.Generator().manual_seed(samplers.chunk_seed(seed, c, stream))
    return torch.randn((samplers.NOISE_CHUNK, *per_image), generator=g)[:rows]


def fresh_inputs(name, plan, c, seed, rows, shape):
    """The consistency sampler's per-image re-noising noise of those rows (else nothing)."""
    if name != "consistency" or plan.num_steps < 2:
        return {}
    rows = chunk_rows(c, seed, rows, (plan.num_steps - 1, *shape), generate_module.RENOISE_STREAM)
    return {"noise": list(rows.unbind(1))}


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
def test_image_noise_is_the_same_for_any_batch_size_block_and_n(shape):
    """Image i's noise is row i % 64 of chunk i // 64 whatever the batch size, the number of
    samples and the block asked for, so each rank's block holds one process's noise for
    those images for any world size (and a rank draws only the chunks it overlaps)."""
    n = 150  # three chunks, the last one partial
    whole = torch.cat([chunk_rows(c, 11, samplers.NOISE_CHUNK, shape) for c in range(3)])[:n]
    for batch in (1, 7, 64, 150, 500):
        got = list(samplers.noise_batches(n, batch, shape, seed=11))
        assert [x.shape[0] for x in got[:-1]] == [batch] * (len(got) - 1)
        assert torch.equal(torch.cat(got), whole), f"batch size {batch}"
    assert torch.equal(torch.cat(list(samplers.noise_batches(10, 4, shape, 11))), whole[:10])
    for world in (1, 2, 3, 4, 6):
        blocks = [samplers.shard_samples(n, rank, world) for rank in range(world)]
        assert [i for b in blocks for i in b] == list(range(n))  # they tile the samples
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
        got = [x for b in blocks for x in samplers.noise_batches(n, 7, shape, 11, "cpu", b)]
        assert torch.equal(torch.cat(got), whole), f"world size {world}"
    assert not torch.equal(next(samplers.noise_batches(n, 64, shape, 12)), whole[:64])


def test_noise_stream_draws_each_chunk_once_for_consecutive_batches(monkeypatch):
    calls = []
    real = torch.randn
    monkeypatch.setattr(generate_module.torch, "randn", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert sum(x.shape[0] for x in samplers.noise_batches(200, 3, (1, 2, 2), 0)) == 200
    assert len(calls) == 4  # chunks 0..3, not one draw per batch


def test_noise_rows_are_tensors_of_their_own():
    stream = samplers.NoiseStream((1, 2, 2), seed=0)
    first = stream(0, 3)
    want = first.clone()
    first.mul_(0)  # a sampler writing into its x_T
    assert torch.equal(stream(0, 3), want) and torch.equal(stream(2, 70)[0], want[2])


def test_noise_blocks_must_be_contiguous_and_inside():
    for bad in (range(0, 10, 2), range(4, 11), range(-4, 4)):
        with pytest.raises(ValueError, match="contiguous block"):
            next(samplers.noise_batches(10, 4, (1, 2, 2), 0, "cpu", bad))
    assert list(samplers.noise_batches(10, 4, (1, 2, 2), 0, "cpu", range(8, 8))) == []
    assert [x.shape[0] for x in samplers.noise_batches(10, 4, (1, 2, 2), 0, "cpu", range(5, 10))] == [4, 1]


@pytest.mark.parametrize("name, steps", [("ddim", 2), ("consistency", 4), ("consistency", 1)])
def test_generate_gives_image_i_the_same_pixels_for_any_batch_size_and_n(name, steps):
    """The same seed gives the same images for batch sizes 1, 7 and 64 and for a number of
    samples no batch divides (the consistency sampler's re-noising included)."""
    model = TinyNet(ch=3, width=8).eval()
    kw = dict(shape=(3, 4, 5), plan=plan_of(8, 1, steps), sampler=name, progress=False, seed=2)
    want = torch.cat(list(samplers.generate(model, 150, 150, **kw)))
    for n, batch in ((150, 1), (150, 7), (150, 64), (71, 7), (71, 64)):
        got = torch.cat(list(samplers.generate(model, n, batch, **kw)))
        torch.testing.assert_close(got, want[:n], rtol=0, atol=1e-6, msg=f"n={n}, batch {batch}")
    assert not torch.allclose(want[:64], want[64:128])  # chunks differ
    if name == "consistency" and steps > 1:  # the re-noising is per image too: another stream, the same x_T
        x_T = torch.cat(list(samplers.noise_batches(150, 64, (3, 4, 5), 2)))
        assert not torch.allclose(want, samplers.get_sampler(name)(model, x_T, kw["plan"]), atol=1e-3)


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


@pytest.mark.cuda
def test_captured_consistency_reads_the_noise_it_is_given_and_generate_is_batch_free_on_cuda():
    """GraphSampler copies passed-in re-noising noise into its graph (the eager images on
    that noise), and on CUDA too image i is the same for batch sizes 1, 7 and 64."""
    model = TinyNet(ch=3).cuda().eval()
    plan = plan_of(16, 2, 4, "cuda")
    sampler = samplers.GraphSampler(model, plan, "consistency")
    fn = samplers.get_sampler("consistency")
    for _ in range(2):
        x_T = torch.randn(5, 3, 8, 8, device="cuda")
        noise = [torch.randn_like(x_T) for _ in range(3)]
        torch.testing.assert_close(sampler(x_T, noise=noise), fn(model, x_T, plan, noise=noise),
                                   rtol=1e-5, atol=1e-5)
    assert sampler.fell_back is None and sampler.num_graphs == 1
    kw = dict(shape=(3, 8, 8), plan=plan, sampler="consistency", progress=False, seed=1,
              device="cuda", dtype="fp32")
    want = torch.cat(list(samplers.generate(model, 100, 100, **kw)))
    for batch in (1, 7, 64):
        got = torch.cat(list(samplers.generate(model, 100, batch, **kw)))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"batch {batch}")


# --------------------------------------------------------------------------- processes


def _info(T=8, time_scale=1):
    """What sample_images reads of a checkpoint's DiffusionInfo, for a TinyNet."""
    cfg = SimpleNamespace(in_channels=3, image_size=5)
    return SimpleNamespace(config=cfg, T=T, time_scale=time_scale, prediction="x0")


CASES = (("ddim", 2), ("consistency", 4))


def _sample_on_rank(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TinyNet(ch=3, width=8).eval()
        got = {f"{name}{steps}": sample_images(model, _info(), num_samples=71, num_steps=steps,
                                               batch_size=16, sampler=name, seed=4, progress=False,
                                               dist=DistInfo(rank, world, rank, "gloo"))
               for name, steps in CASES}
        torch.save(got, f"{out}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_two_gloo_processes_make_the_images_of_one(tmp_path):
    """71 images over 2 gloo ranks (36 + 35, batches of 16: no rank's block is whole
    batches or whole chunks) are the images one process makes in batches of 7, for DDIM and
    the 4-step consistency sampler; rank 1 gets None."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sample_on_rank, args=(2, port, str(tmp_path)), nprocs=2)
    gathered, other = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    torch.manual_seed(0)
    model = TinyNet(ch=3, width=8).eval()
    for name, steps in CASES:
        alone = sample_images(model, _info(), num_samples=71, num_steps=steps, batch_size=7,
                              sampler=name, seed=4, progress=False)
        assert gathered[f"{name}{steps}"].shape == (71, 3, 5, 5) and other[f"{name}{steps}"] is None
        torch.testing.assert_close(gathered[f"{name}{steps}"], alone, rtol=0, atol=1)  # uint8 rounding
