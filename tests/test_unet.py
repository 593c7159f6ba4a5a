"""The DDPM U-Net: reference state-dict layout, the reference computation (float64), memory
formats, autocast, conditioning, and capture-friendliness."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import reference_keys
from rcfd.core.unet import AttnBlock, UNet, UNetConfig, sinusoidal_table

def read_reference_keys() -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """(key, shape) rows of the reference U-Net in file order and its stated parameter count."""
    rows, stated = reference_keys.read_reference_keys("unet")
    assert stated is not None, "the key list's header states no parameter count"
    return rows, stated


def small_config(**kw) -> UNetConfig:
    base = dict(image_size=8, in_channels=3, ch=32, ch_mult=(1, 2), attn=(1,), num_res_blocks=1,
                dropout=0.0, num_time_indices=17)
    return UNetConfig(**{**base, **kw})


@torch.no_grad()
def scramble(model: torch.nn.Module) -> torch.nn.Module:
    """Random O(1) weights everywhere (the DDPM init zeroes the output and every residual
    branch, which would make equality tests vacuous). The time table stays as it is."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() > 1:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
        else:
            p.normal_(0.0 if name.endswith("bias") else 1.0, 0.2)
    return model


# ------------------------------------------------------------- a direct transcription, float64
def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"])


def _conv(x, sd, p, **kw):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], **kw)


def _attn_reference(x, sd, p):
    B, C, H, W = x.shape
    h = _gn(x, sd, p + ".group_norm")
    q, k, v = (_conv(h, sd, f"{p}.proj_{n}").reshape(B, C, H * W) for n in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=-1)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W)
    return x + _conv(out, sd, p + ".proj")


def _res_reference(x, temb, sd, p):
    h = _conv(F.silu(_gn(x, sd, p + ".block1.0")), sd, p + ".block1.2", padding=1)
    h = h + F.linear(F.silu(temb), sd[p + ".temb_proj.1.weight"], sd[p + ".temb_proj.1.bias"])[..., None, None]
    h = _conv(F.silu(_gn(h, sd, p + ".block2.0")), sd, p + ".block2.3", padding=1)
    h = h + (_conv(x, sd, p + ".shortcut") if p + ".shortcut.weight" in sd else x)
    return _attn_reference(h, sd, p + ".attn") if p + ".attn.proj_q.weight" in sd else h


def reference_forward(sd, x, t):
    """The DDPM U-Net computed straight from a state dict of the reference layout."""
    e = "time_embedding.timembedding."
    temb = sd[e + "0.weight"][t]
    temb = F.linear(F.silu(F.linear(temb, sd[e + "1.weight"], sd[e + "1.bias"])),
                    sd[e + "3.weight"], sd[e + "3.bias"])
    h = _conv(x, sd, "head", padding=1)
    hs, i = [h], 0
    while f"downblocks.{i}.main.weight" in sd or f"downblocks.{i}.block1.0.weight" in sd:
        if f"downblocks.{i}.main.weight" in sd:
            h = _conv(h, sd, f"downblocks.{i}.main", stride=2, padding=1)
        else:
            h = _res_reference(h, temb, sd, f"downblocks.{i}")
        hs.append(h)
        i += 1
    h = _res_reference(_res_reference(h, temb, sd, "middleblocks.0"), temb, sd, "middleblocks.1")
    i = 0
    while f"upblocks.{i}.main.weight" in sd or f"upblocks.{i}.block1.0.weight" in sd:
        if f"upblocks.{i}.main.weight" in sd:
            h = _conv(F.interpolate(h, scale_factor=2, mode="nearest"), sd, f"upblocks.{i}.main", padding=1)
        else:
            h = _res_reference(torch.cat([h, hs.pop()], dim=1), temb, sd, f"upblocks.{i}")
        i += 1
    assert not hs
    return _conv(F.silu(_gn(h, sd, "tail.0")), sd, "tail.2", padding=1)


# ------------------------------------------------------------- reference layout (CIFAR-10)
@pytest.fixture(scope="module")
def cifar_model():
    torch.manual_seed(0)
    return UNet(UNetConfig.cifar10())


def test_cifar10_state_dict_matches_reference_keys(cifar_model):
    rows, _ = read_reference_keys()
    ours = [(k, tuple(v.shape)) for k, v in cifar_model.state_dict().items()]
    assert [k for k, _ in ours] == [k for k, _ in rows]
    assert ours == rows


def test_cifar10_parameter_count_includes_the_frozen_time_table(cifar_model):
    rows, stated = read_reference_keys()
    assert stated == sum(math.prod(s) for _, s in rows)  # the stated count includes the table
    table = cifar_model.time_embedding.timembedding[0].weight
    assert not table.requires_grad
    assert cifar_model.num_parameters() == stated
    assert cifar_model.num_parameters(trainable_only=True) == stated - table.numel()
    assert table.shape == (UNetConfig.cifar10().num_time_indices, UNetConfig.cifar10().ch)


def test_cifar10_forward_tiny_batch(cifar_model):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = cifar_model.eval()(x, torch.tensor([1024]))
    assert out.shape == x.shape and torch.isfinite(out).all()


# ------------------------------------------------------------- the computation
def test_matches_direct_transcription_float64():
    cfg = small_config(ch_mult=(1, 2, 2), attn=(0, 2), num_res_blocks=2, image_size=12)
    model = scramble(UNet(cfg)).double().eval()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    t = torch.tensor([0, 7, 16])
    sd = {k: v for k, v in model.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), reference_forward(sd, x, t), rtol=1e-10, atol=1e-10)


def test_time_table_is_the_interleaved_sinusoid():
    n, d = 1025, 10
    table = sinusoidal_table(n, d).double()
    i = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(d // 2, dtype=torch.float64)[None, :]
    angle = i * torch.pow(torch.tensor(10000.0, dtype=torch.float64), -2 * j / d)
    torch.testing.assert_close(table[:, 0::2], angle.sin(), rtol=0, atol=1e-7)
    torch.testing.assert_close(table[:, 1::2], angle.cos(), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_table(4, 7)


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (8, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_matches_explicit_softmax_float64(hw, channels_last):
    block = scramble(AttnBlock(64)).double()
    x = torch.randn(2, 64, *hw, dtype=torch.float64)
    sd = {"a." + k: v for k, v in block.state_dict().items()}
    expected = _attn_reference(x, sd, "a")
    if channels_last:
        block, x = block.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_output_shape_and_eval_determinism():
    model = UNet(small_config(out_channels=2, dropout=0.3)).eval()
    x, t = torch.randn(5, 3, 8, 8), torch.randint(0, 17, (5,))
    with torch.no_grad():
        a, b = model(x, t), model(x, t)
    assert a.shape == (5, 2, 8, 8)
    assert torch.equal(a, b)


def test_dropout_is_active_in_train_mode_only():
    x, t = torch.randn(2, 3, 8, 8), torch.randint(0, 17, (2,))
    model = scramble(UNet(small_config(dropout=0.5)))
    with torch.no_grad():
        assert not torch.equal(model.train()(x, t), model(x, t))
        assert torch.equal(model.eval()(x, t), model(x, t))
        no_dropout = scramble(UNet(small_config(dropout=0.0))).train()
        assert torch.equal(no_dropout(x, t), no_dropout(x, t))


def test_scalar_time_broadcasts_and_float_time_is_refused():
    model = scramble(UNet(small_config())).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor(5)), model(x, torch.full((3,), 5)))
    with pytest.raises(TypeError, match="integer schedule index"):
        model(x, torch.full((3,), 5.0))


def test_class_conditioning():
    model = scramble(UNet(small_config(num_classes=7))).double().eval()
    x, t = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 17, (4,))
    y = torch.tensor([0, 6, 3, 3])
    with torch.no_grad():
        out = model(x, t, y)
        assert out.shape == x.shape
        assert not torch.allclose(out, model(x, t, (y + 1) % 7))
        # the reference applies y_embedding as a Linear on one-hot labels: the gather equals it
        lin = model.y_embedding
        onehot = F.linear(F.one_hot(y, 7).double(), lin.weight, lin.bias)
        gathered = lin.weight.index_select(1, y).t() + lin.bias
        torch.testing.assert_close(gathered, onehot, rtol=1e-12, atol=1e-12)
    assert model.state_dict()["y_embedding.weight"].shape == (4 * 32, 7)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        UNet(small_config())(x.float(), t, y)


def test_channels_last_matches_contiguous():
    model = scramble(UNet(small_config(ch_mult=(1, 2, 2), image_size=12))).eval()
    x, t = torch.randn(3, 3, 12, 12), torch.tensor([0, 5, 16])
    with torch.no_grad():
        expected = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_bf16_autocast_stays_close_to_float32():
    model = scramble(UNet(small_config())).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 9])
    with torch.no_grad():
        expected = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - expected).norm() / expected.norm()).item() < 0.05


def test_forward_traces_as_one_graph():
    """No host syncs or data-dependent Python branches: dynamo captures the whole forward."""
    model = scramble(UNet(small_config(num_classes=3))).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 16]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y))


# ------------------------------------------------------------- config
def test_config_round_trips_through_json():
    for cfg in (UNetConfig.cifar10(), UNetConfig.digits(), small_config(num_classes=10, out_channels=6)):
        d = cfg.to_dict()
        assert UNetConfig.from_dict(json.loads(json.dumps(d))) == cfg
        assert isinstance(d["ch_mult"], list) and isinstance(d["attn"], list)


def test_config_defaults_and_normalisation():
    cfg = UNetConfig(in_channels=1, ch_mult=[1, 2, 2, 2], attn=[1, 1])
    assert cfg.out_channels == 1 and cfg.ch_mult == (1, 2, 2, 2) and cfg.attn == (1,)
    assert UNetConfig.cifar10() == UNetConfig()
    assert UNetConfig.digits(num_res_blocks=2).num_res_blocks == 2


@pytest.mark.parametrize("bad, match", [
    (dict(ch=48), "multiple of 32"),
    (dict(attn=(4,)), "attn levels"),
    (dict(image_size=20), "divisible"),
    (dict(ch_mult=()), "at least 1 item"),
    (dict(ch_mult=2), "ch_mult"),
    (dict(ch=65536), "ch"),  # sizes from a file are bounded before anything is allocated
    (dict(ch=2048, ch_mult=(1, 8)), "at most 8192"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_time_indices=0), "num_time_indices"),
    (dict(num_classes=0), "num_classes"),
    (dict(image_size=True), "image_size"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**bad)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="channels: unknown key.*valid keys there"):
        UNetConfig.from_dict({**UNetConfig().to_dict(), "channels": 3})


@pytest.mark.parametrize("cfg", [
    small_config(),
    small_config(ch_mult=(1, 2, 2), attn=(0, 2), num_res_blocks=3, image_size=12, num_classes=5),
    UNetConfig.digits(),
])
def test_config_is_inferred_from_a_state_dict(cfg):
    sd = UNet(cfg).state_dict()
    assert UNetConfig.from_state_dict(sd, image_size=cfg.image_size, dropout=cfg.dropout) == cfg


def test_config_inferred_from_the_reference_key_list():
    rows, _ = read_reference_keys()
    sd = {k: torch.empty(s) for k, s in rows}
    assert UNetConfig.from_state_dict(sd, image_size=32, dropout=0.1) == UNetConfig.cifar10()


def test_digits_config_runs_on_its_images():
    cfg = UNetConfig.digits()
    model = UNet(cfg).eval()
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        assert model(x, torch.tensor([0, cfg.num_time_indices - 1])).shape == x.shape


# ------------------------------------------------------------- GPU
@pytest.mark.cuda
def test_cuda_channels_last_bf16_uses_fused_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = scramble(UNet(small_config(ch_mult=(1, 2, 2), image_size=16))).cuda().eval()
    x, t = torch.randn(4, 3, 16, 16, device="cuda"), torch.tensor([0, 3, 9, 16], device="cuda")
    with torch.no_grad():
        expected = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        xcl = x.to(memory_format=torch.channels_last)
        # refuse the math fallback: attention must run on a fused kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(xcl, t)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 0.05


@pytest.mark.cuda
def test_cuda_graph_capture_replays_the_forward():
    model = scramble(UNet(small_config(num_classes=4))).cuda().eval()
    x = torch.randn(3, 3, 8, 8, device="cuda")
    t, y = torch.tensor([1, 2, 16], device="cuda"), torch.tensor([0, 1, 3], device="cuda")
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(x, t, y)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x, t, y)
        x.copy_(torch.randn_like(x))
        t.copy_(torch.tensor([5, 0, 9], device="cuda"))
        graph.replay()
        torch.testing.assert_close(out, model(x, t, y))


@pytest.mark.cuda
def test_cuda_inductor_compile_matches_eager(monkeypatch):
    # full fp32 on both sides: TF32 convolutions (cuDNN's default) would differ by ~1e-3 per layer
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = scramble(UNet(small_config())).cuda().eval()
    compiled = torch.compile(model, fullgraph=True)
    x, t = torch.randn(2, 3, 8, 8, device="cuda"), torch.tensor([1, 16], device="cuda")
    with torch.no_grad():
        out, expected = compiled(x, t), model(x, t)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-4
