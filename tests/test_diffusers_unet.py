"""Our U-Net and diffusers' UNet2DModel map weight for weight: random models converted
either way compute the same outputs (fp32, 1e-5) at integer and fractional timesteps, the
state-dict round trips are exact, and options we cannot represent are refused by name."""

import pytest
import torch

from rcfd.core.unet import UNet, UNetConfig
from rcfd.errors import ConfigError, StateDictMismatchError
from rcfd.interop.diffusers_unet import (
    TABLE_KEY,
    diffusers_config_from_unet,
    state_dict_from_diffusers,
    state_dict_to_diffusers,
    unet_config_from_diffusers,
)

diffusers = pytest.importorskip("diffusers")

# google/ddpm-cifar10-32's UNet2DModel config (as its config.json states it)
DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                          "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
    freq_shift=1, act_fn="silu", attention_head_dim=None, resnet_time_scale_shift="default",
    time_embedding_type="positional", center_input_sample=False, dropout=0.0)
# a small one with diffusers' other defaults: [cos | sin] order, padding 1, eps 1e-5
SMALL = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64),
             layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)
GRID = 1024  # our index grid 0..1024; a 1000-step model is evaluated at i * 999 / 1024
FRACTIONAL = 999 / GRID


def randomized(model):
    """Non-trivial weights everywhere (norm affines included), so no term hides."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def their_model(kw):
    return randomized(diffusers.UNet2DModel(**kw))


def outputs_agree(theirs, ours, their_t, our_t, channels, size):
    x = torch.randn(1, channels, size, size)
    with torch.no_grad():
        a = theirs(x, their_t).sample
        b = ours(x, our_t)
    scale = float(a.abs().max())
    assert scale > 0.1  # a real signal, not a near-zero output
    # 1e-5 of the output's scale: the fp32 noise of the network itself (diffusers' own model
    # in float64 differs from it in fp32 by ~1e-5 at outputs of ~5)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * max(1.0, scale))


@pytest.mark.parametrize("kw", [DDPM_CIFAR10, SMALL], ids=["ddpm-cifar10", "small"])
def test_a_diffusers_model_converted_to_ours_computes_the_same(kw):
    theirs = their_model(kw)
    config = unet_config_from_diffusers(theirs.config)
    ours = UNet(config).eval()
    ours.load_state_dict(state_dict_from_diffusers(theirs.state_dict(), config,
                                                   diffusers_config=theirs.config))
    for t in (0, 417, 999):
        outputs_agree(theirs, ours, torch.tensor([t]), torch.tensor([t]), kw["in_channels"],
                      kw["sample_size"])


@pytest.mark.parametrize("kw", [DDPM_CIFAR10, SMALL], ids=["ddpm-cifar10", "small"])
def test_fractional_timesteps_are_our_index_times_the_input_scale(kw):
    theirs = their_model(kw)
    config = unet_config_from_diffusers(theirs.config, num_time_indices=GRID + 1,
                                        time_input_scale=FRACTIONAL)
    ours = UNet(config).eval()
    ours.load_state_dict(state_dict_from_diffusers(theirs.state_dict(), config,
                                                   diffusers_config=theirs.config))
    for i in (1, 333, 1024):  # 333 * 999 / 1024 is not an integer
        outputs_agree(theirs, ours, torch.tensor([i * FRACTIONAL]), torch.tensor([i]),
                      kw["in_channels"], kw["sample_size"])


def test_the_ddpm_cifar10_config_is_our_reference_network_with_its_three_options():
    config = unet_config_from_diffusers(DDPM_CIFAR10)
    assert config == UNetConfig.cifar10(norm_eps=1e-6, downsample_padding=0, freq_shift=1.0,
                                        dropout=0.0, num_time_indices=1000)
    back = diffusers_config_from_unet(config)
    for key, value in DDPM_CIFAR10.items():
        assert back[key] == (list(value) if isinstance(value, tuple) else value), key


@pytest.mark.parametrize("kw", [DDPM_CIFAR10, {**SMALL, "flip_sin_to_cos": False}],
                         ids=["ddpm-cifar10", "small"])
def test_diffusers_to_ours_and_back_is_exact(kw):
    theirs = their_model(kw)
    config = unet_config_from_diffusers(theirs.config)
    ours = state_dict_from_diffusers(theirs.state_dict(), config, diffusers_config=theirs.config)
    back = state_dict_to_diffusers(ours, config)
    original = theirs.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("scale", [1.0, FRACTIONAL], ids=["positional", "learned"])
def test_ours_to_diffusers_and_back(scale):
    config = UNetConfig.digits(ch_mult=(1, 2), num_time_indices=GRID + 1,
                               time_input_scale=scale, dropout=0.0)
    ours = randomized(UNet(config))
    dcfg = diffusers_config_from_unet(config)
    assert dcfg["time_embedding_type"] == ("positional" if scale == 1.0 else "learned")
    theirs = diffusers.UNet2DModel(**dcfg).eval()
    theirs.load_state_dict(state_dict_to_diffusers(ours.state_dict(), config))  # strict
    for i in (0, 5, 1024):
        outputs_agree(theirs, ours, torch.tensor([i]), torch.tensor([i]), 1, 16)
    again = unet_config_from_diffusers(theirs.config, num_time_indices=GRID + 1,
                                       time_input_scale=scale)
    sd = state_dict_from_diffusers(theirs.state_dict(), again, diffusers_config=theirs.config)
    assert again == config
    original = ours.state_dict()
    assert all(torch.equal(sd[k], original[k]) for k in original)
    if scale != 1.0:  # a learned table read with the wrong scale is refused, not misread
        wrong = unet_config_from_diffusers(theirs.config, num_time_indices=GRID + 1)
        with pytest.raises(StateDictMismatchError, match="time_input_scale"):
            state_dict_from_diffusers(theirs.state_dict(), wrong, diffusers_config=theirs.config)


@pytest.mark.parametrize("change, named", [
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"num_class_embeds": 10}, "num_class_embeds"),
    ({"add_attention": False}, "add_attention"),
    ({"mid_block_type": None}, "mid_block_type"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"upsample_type": "resnet"}, "upsample_type"),
    ({"center_input_sample": True}, "center_input_sample"),
    ({"attention_head_dim": 8}, "attention_head_dim"),
    ({"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D")}, "CrossAttnDownBlock2D"),
    ({"up_block_types": ("UpBlock2D", "UpBlock2D")}, "do not mirror"),
    ({"block_out_channels": (32, 48)}, "multiples"),
    ({"sample_size": (16, 32)}, "square"),
])
def test_what_we_cannot_represent_is_refused_by_name(change, named):
    with pytest.raises(ConfigError, match="cannot represent") as e:
        unet_config_from_diffusers({**SMALL, **change})
    assert named in str(e.value) and "supported:" in str(e.value)
    assert "\n" not in str(e.value)


def test_absurd_sizes_are_refused_before_anything_is_allocated():
    with pytest.raises(ConfigError, match="out of range"):
        unet_config_from_diffusers({**SMALL, "block_out_channels": (1 << 20, 1 << 21)})
    with pytest.raises(ConfigError, match="out of range"):
        unet_config_from_diffusers(SMALL, num_time_indices=1 << 40)


def test_a_state_dict_that_does_not_fit_the_config_is_named():
    theirs = their_model(SMALL)
    config = unet_config_from_diffusers(theirs.config)
    sd = dict(theirs.state_dict())
    sd["conv_in.weight"] = sd["conv_in.weight"][:16]
    with pytest.raises(StateDictMismatchError, match="conv_in.weight"):
        state_dict_from_diffusers(sd, config)
    del sd["conv_in.weight"]
    with pytest.raises(StateDictMismatchError, match="lacks 'conv_in.weight'"):
        state_dict_from_diffusers(sd, config)
    extra = {**theirs.state_dict(), "class_embedding.weight": torch.zeros(3, 128)}
    with pytest.raises(StateDictMismatchError, match="class_embedding"):
        state_dict_from_diffusers(extra, config)


def test_class_conditional_models_are_not_exported():
    with pytest.raises(ConfigError, match="class-conditional"):
        diffusers_config_from_unet(UNetConfig.digits(num_classes=10))


def test_the_time_table_is_ours_only_for_positional_models():
    config = unet_config_from_diffusers(SMALL)
    theirs = state_dict_to_diffusers(UNet(config).state_dict(), config)
    assert not any("time_proj" in k for k in theirs) and TABLE_KEY not in theirs
