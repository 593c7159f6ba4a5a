"""The fast training step (rcfd.training.fast_step): the objective compiled as one region
against the eager step, with the noise drawn outside it.

Tolerances, stated once:

* eager ``ObjectiveStep`` vs calling the loss object: bit for bit (the same ops);
* Dynamo + AOTAutograd without a code generator (``aot_eager``): the same values up to
  fp32 reassociation, ``rtol = 1e-5``;
* Inductor on the CPU in fp32 (``slow``: compiling costs minutes on a small CPU): loss
  within ``rtol = 1e-4`` and every gradient within ``3e-4`` of the largest gradient entry
  (measured on a 2-core EPYC: loss 0 / 7e-6 and gradients 1e-7 / 2.5e-5 for base / RCFD;
  RCFD's KL gradient ``(q - p) / B`` is a difference of nearly equal softmaxes);
* CUDA, the fast step as the trainers run it (Inductor, bf16 autocast, channels_last)
  against the fp32 eager step (no TF32): loss within ``rtol = 2e-2`` (bf16 keeps 8 bits of
  mantissa, a relative step of 2**-8 = 4e-3 per rounding), gradient cosine similarity
  above 0.99.
"""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._inductor.utils import run_and_get_code

from rcfd.core.precision import autocast
from rcfd.core.classifiers import ClassifierConfig, build, frozen
from rcfd.core.schedule import cosine_schedule
from rcfd.core.unet import UNet, UNetConfig
from rcfd.data import DatasetSpec
from rcfd.io.modelfile import load_model_file
from rcfd.losses import DenoisingLoss, PDLoss, RCFDLoss, RCFDLossConfig
from rcfd.methods.base import BaseStageConfig, train_base
from rcfd.methods.common import TrainOptions
from rcfd.training import fast_step
from rcfd.training.fast_step import ObjectiveStep, compile_step
from rcfd.training.loop import StepInfo
from rcfd.training.rundir import RunContext

UNET = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1,), attn=(), num_res_blocks=1,
                  dropout=0.0, num_time_indices=9)
BATCH = 6
RANDOM_OPS = ("rand", "normal", "bernoulli", "multinomial", "uniform", "exponential")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _empty_compile_cache():
    """Each test compiles from an empty Dynamo cache: they all compile the same function,
    ObjectiveStep.loss, and Dynamo keeps a limited number of versions of one function."""
    torch.compiler.reset()


def lively(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights that make every layer matter: the DDPM initialisation scales the last layer
    of each block by 1e-5, which would leave the outputs (and the test) near zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return net


def make_case(kind: str, device="cpu"):
    """``(student, objective, x0)``: a base, PD or RCFD objective of tiny networks."""
    torch.manual_seed(0)
    student = lively(UNet(UNET), 1).to(device)
    schedule = cosine_schedule(8, 1)
    x0 = (torch.rand(BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(device)
    if kind == "base":
        return student, DenoisingLoss(schedule, 8, 1, "both"), x0
    teacher = lively(UNet(UNET), 3).to(device).eval().requires_grad_(False)
    pd = PDLoss(teacher, schedule, 8, 1, "both")
    if kind == "pd":
        return student, pd, x0
    classifier = build(ClassifierConfig(name="resnet18", width=8, in_channels=1))
    classifier = frozen(lively(classifier, 4).to(device))
    return student, RCFDLoss(pd, classifier, RCFDLossConfig(tau=0.9, alpha=0.5, beta=0.5)), x0


def info(device="cpu", seed=5) -> StepInfo:
    return StepInfo(step=0, generator=torch.Generator(device).manual_seed(seed), rank=0,
                    world_size=1, global_batch=BATCH)


def loss_and_grads(step, student, x0, sinfo):
    """``(loss, terms, grads)`` of one call of ``step(student, x0, None, sinfo)``."""
    student.zero_grad(set_to_none=True)
    loss, terms = step(student, x0, None, sinfo)
    loss.backward()
    grads = [p.grad.detach().clone() for p in student.parameters() if p.grad is not None]
    return loss.detach(), {k: v.detach() for k, v in terms.items()}, grads


def recording_backend(graphs: list):
    """A torch.compile backend that keeps every Dynamo graph and runs it with AOTAutograd
    (forward and backward traced, no code generated)."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)
    return backend


def frozen_networks(objective) -> list:
    """The teacher and classifier of a PD / RCFD objective (none for the base loss)."""
    if isinstance(objective, RCFDLoss):
        return [objective.pd.teacher, objective.classifier]
    return [objective.teacher] if isinstance(objective, PDLoss) else []


def flat(grads):
    return torch.cat([g.double().flatten() for g in grads])


# --------------------------------------------------------------------------- eager


@pytest.mark.parametrize("kind", ["base", "pd", "rcfd"])
def test_eager_step_is_the_objective_bit_for_bit(kind):
    """The eager step against the loss object called here on a copy of the student, with
    ``t`` and the noise drawn here by the documented rule (METHOD.md: ``t ~ U{0..T}`` for
    base training, ``t = 2 U{1..T/2}`` for PD and RCFD, then ``eps ~ N(0, I)``, from the
    step's seeded generator) and the gradients from ``torch.autograd.grad``: the same loss,
    terms and gradient of every parameter, bit for bit, and the generator left where the
    draw leaves it."""
    student, objective, x0 = make_case(kind)
    twin = copy.deepcopy(student)
    g = torch.Generator().manual_seed(5)
    low, high, times = (0, 8, 1) if kind == "base" else (1, 4, 2)
    t = times * torch.randint(low, high + 1, (BATCH,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    want = objective(twin, x0, t, noise)
    trainable = [name for name, p in twin.named_parameters() if p.requires_grad]
    params = dict(twin.named_parameters())
    want_grads = torch.autograd.grad(want.loss, [params[n] for n in trainable], allow_unused=True)
    sinfo = info(seed=5)
    loss, terms, _ = loss_and_grads(ObjectiveStep(objective), student, x0, sinfo)
    assert torch.equal(loss, want.loss.detach())
    assert terms.keys() == want.terms.keys()
    assert all(torch.equal(terms[k], want.terms[k]) for k in terms)
    assert sum(w is not None for w in want_grads) > 0
    got = {name: p.grad for name, p in student.named_parameters()}
    assert all(got[name] is None for name in set(got) - set(trainable))
    for name, w in zip(trainable, want_grads):
        assert (got[name] is None) == (w is None), name
        assert w is None or torch.equal(got[name], w), name
    assert torch.equal(sinfo.generator.get_state(), g.get_state())


def test_objective_must_be_a_loss_object():
    with pytest.raises(TypeError, match="draw"):
        ObjectiveStep(lambda model, x0, t, noise: None)


def test_compile_takes_effect_on_cuda_only():
    assert not compile_step(True, torch.device("cpu"))
    assert compile_step(True, torch.device("cuda"))
    assert not compile_step(False, torch.device("cuda"))


def test_warm_up_leaves_every_rng_as_it_was():
    student, objective, x0 = make_case("pd")
    student = UNet(UNET.replace(dropout=0.5))  # dropout draws from the global RNG
    t, noise = objective.draw(torch.Generator().manual_seed(0), x0)
    before = torch.get_rng_state()
    fast_step._warm_up(objective, student.train(), x0, t, noise)
    assert torch.equal(torch.get_rng_state(), before)


def stage_frames(regions, limit=1) -> list[int]:
    """Dynamo's frame count after one step of a base, a PD and an RCFD objective, each
    compiled in the given region, with at most ``limit`` recompiles per function."""
    counter, frames = CompileCounter(), []
    with torch._dynamo.config.patch(recompile_limit=limit):
        for kind, region in zip(("base", "pd", "rcfd"), regions):
            student, objective, x0 = make_case(kind)
            step = ObjectiveStep(objective).compiled(counter, region=region)
            loss_and_grads(step, student, x0, info())
            frames.append(counter.frame_count)
    return frames


@pytest.mark.skipif(not fast_step._isolates_recompiles(), reason="this torch's compile has no isolate_recompiles")
def test_each_stage_compiles_in_its_own_region_without_a_cache_reset(monkeypatch):
    """Stages count recompiles apart, so a later stage still compiles (instead of falling
    back to eager at Dynamo's limit), and the library never empties Dynamo's cache."""
    monkeypatch.setattr(torch.compiler, "reset", lambda: pytest.fail("the library reset Dynamo's cache"))
    apart = stage_frames(("base", "pd", "rcfd"))
    assert apart[0] < apart[1] < apart[2], apart
    shared = stage_frames(("one", "one", "one"))  # the failure the regions prevent
    assert shared[2] == shared[1], shared


def test_the_cpu_loop_ignores_compile_and_stays_exact(tmp_path):
    """``options.compile`` (the default) leaves a CPU run eager: the same weights, bit for
    bit, as ``compile=False``."""
    data = DatasetSpec(name="digits", image_size=8)
    states = []
    for i, compiled in enumerate((True, False)):
        opts = TrainOptions(bf16=False, channels_last=False, fused=False, compile=compiled)
        cfg = BaseStageConfig(unet=UNET, T=8, lr=2e-3, warmup=2, batch_size=16, steps=4,
                              ema_decay=0.9, num_sample_images=0, log_interval=1, options=opts)
        path = train_base(cfg, data, RunContext(tmp_path / str(i), device="cpu", progress=False))
        states.append(load_model_file(path))
    for key in ("state_dict", "ema_state_dict"):
        a, b = states[0][key], states[1][key]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key


# --------------------------------------------------------------------------- compiled, CPU


@pytest.mark.parametrize("kind", ["base", "rcfd"])
def test_compiled_step_draws_outside_the_graph(kind):
    """Dynamo + AOTAutograd: no random op inside any compiled graph, the generator moves
    exactly as in the eager step, and loss, terms and gradients are the eager ones."""
    student, objective, x0 = make_case(kind)
    a, b, graphs = info(), info(), []
    want = loss_and_grads(ObjectiveStep(objective), student, x0, a)
    step = ObjectiveStep(objective).compiled(recording_backend(graphs))
    got = loss_and_grads(step, student, x0, b)
    assert graphs, "nothing was compiled"
    ops = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert not [o for o in ops if any(r in o for r in RANDOM_OPS)]
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


def test_later_halving_rounds_reuse_the_compiled_step():
    """New teacher and student modules and a doubled time scale each round: the second
    round recompiles (with the time scale symbolic), the third compiles nothing."""
    counter, frames = CompileCounter(), []
    schedule = cosine_schedule(8, 1)
    for teacher_T, time_scale in ((8, 1), (4, 2), (2, 4)):
        student, _, x0 = make_case("base")
        teacher = lively(UNet(UNET), teacher_T).eval().requires_grad_(False)
        step = ObjectiveStep(PDLoss(teacher, schedule, teacher_T, time_scale)).compiled(counter)
        loss_and_grads(step, student, x0, info())
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[2] == frames[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["base", "rcfd"])
def test_inductor_step_matches_eager_fp32(kind):
    student, objective, x0 = make_case(kind)
    want = loss_and_grads(ObjectiveStep(objective), student, x0, info())
    got = loss_and_grads(ObjectiveStep(objective).compiled("inductor"), student, x0, info())
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=0)
    scale = max(float(g.abs().max()) for g in want[2])
    assert max(float((g - w).abs().max()) for g, w in zip(got[2], want[2])) <= 3e-4 * scale


def fused_group_norm_silu_kernels(device: str) -> list[str]:
    """Names of the kernels Inductor generates for ``SiLU(GroupNorm(x))`` (forward and
    backward) whose name covers both ops (Inductor names a fused kernel after its ops)."""
    block = torch.nn.Sequential(torch.nn.GroupNorm(8, 32), torch.nn.SiLU()).to(device)
    x = torch.randn(3, 32, 7, 5, device=device, requires_grad=True)

    def f(x):
        y = block(x).square().mean()
        y.backward()
        return y

    _, codes = run_and_get_code(torch.compile(f), x)
    names = set()
    for code in codes:
        for line in code.splitlines():
            word = line.split(" = ")[0].strip()
            if "group_norm" in word and "silu" in word:
                names.add(word)
    return sorted(names)


@pytest.mark.slow
def test_inductor_fuses_group_norm_and_silu_on_cpu():
    names = fused_group_norm_silu_kernels("cpu")
    assert any("backward" not in n for n in names), names
    assert any("backward" in n for n in names), names


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_inductor_fuses_group_norm_and_silu_on_cuda():
    names = fused_group_norm_silu_kernels("cuda")
    assert any("backward" not in n for n in names), names
    assert any("backward" in n for n in names), names


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["base", "rcfd"])
def test_fast_step_matches_fp32_eager_on_cuda(kind):
    student, objective, x0 = make_case(kind, "cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        loss, _, grads = loss_and_grads(ObjectiveStep(objective), student, x0, info("cuda"))
    for net in (student, *frozen_networks(objective)):  # as the trainers lay them out
        net.to(memory_format=torch.channels_last)
    x0 = x0.contiguous(memory_format=torch.channels_last)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True), \
            autocast(torch.device("cuda"), torch.bfloat16):
        fast = loss_and_grads(ObjectiveStep(objective).compiled(), student, x0, info("cuda"))
    torch.testing.assert_close(fast[0], loss, rtol=2e-2, atol=0)
    cos = torch.nn.functional.cosine_similarity(flat(fast[2]), flat(grads), dim=0)
    assert cos > 0.99, float(cos)


@pytest.mark.cuda
def test_compiled_loop_on_cuda_logs_its_compile_time(tmp_path, capfd):
    """The default options on CUDA: the loop runs the compiled step, says how long compiling
    took, and trains to finite weights."""
    cfg = BaseStageConfig(unet=UNET, T=8, batch_size=16, steps=3, ema_decay=None,
                          num_sample_images=0)
    assert cfg.options.compile
    path = train_base(cfg, DatasetSpec(name="digits", image_size=8),
                      RunContext(tmp_path, device="cuda", progress=False))
    assert "compiled the base step (model) in" in capfd.readouterr().err
    state = load_model_file(path)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
