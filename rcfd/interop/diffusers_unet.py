"""Our DDPM U-Net and diffusers' ``UNet2DModel``, weight for weight (data mapping only).

The two networks compute the same function when ``UNet2DModel`` uses only what ours has:
``DownBlock2D`` / ``AttnDownBlock2D`` levels mirrored by ``UpBlock2D`` / ``AttnUpBlock2D``,
the ``UNetMidBlock2D`` (resnet, attention, resnet), single-head attention, SiLU, conv
down/up-sampling, GroupNorm, the "default" time-embedding injection, no class
embedding. The pieces that differ are options of :class:`rcfd.core.unet.UNetConfig`:
``norm_groups``, ``norm_eps``, ``downsample_padding`` and the time table's ``freq_shift``.

The time input. A ``"positional"`` ``UNet2DModel`` embeds a (possibly fractional)
timestep ``s`` as ``[sin(s w), cos(s w)]`` (``[cos, sin]`` when ``flip_sin_to_cos``); ours
gathers row ``i`` of a table holding ``sin, cos`` interleaved at ``i * time_input_scale``.
The column order is folded into the first time Linear (a permutation), so
``UNet(x, i) == UNet2DModel(x, i * time_input_scale)`` with our table built at
``time_input_scale`` (the index grid is the caller's: a 1000-step teacher on our grid
``0..1024`` is ``time_input_scale = 999 / 1024``). A ``"learned"`` ``UNet2DModel`` holds
the table itself (``time_proj``, our interleaved layout); we export to it when
``time_input_scale != 1`` (no positional ``UNet2DModel`` scales its input), and read it
back as our table after checking it is the sinusoid the config describes.

Attention: diffusers' ``to_q/to_k/to_v/to_out.0`` are Linear ``[C, C]``; ours are 1x1
convs ``[C, C, 1, 1]`` (the reference's names). The time table
``time_embedding.timembedding.0.weight`` is ours only (rebuilt from the config) unless the
model is ``"learned"``.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from rcfd.core.unet import MAX_TIME_INDICES, UNet, UNetConfig, sinusoidal_table
from rcfd.errors import ConfigError, StateDictMismatchError

SUPPORTED = ("supported: UNet2DModel with DownBlock2D/AttnDownBlock2D levels mirrored by "
             "UpBlock2D/AttnUpBlock2D, UNetMidBlock2D with attention, one attention head, "
             "silu, conv down/upsampling, 'default' time scale shift, 'positional' or "
             "'learned' time embedding, no class embedding")

# UNet2DModel's defaults, for configs that leave a key out (diffusers writes them all).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
_MUST_EQUAL = {"center_input_sample": False, "mid_block_type": "UNetMidBlock2D",
               "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv",
               "resnet_time_scale_shift": "default", "add_attention": True,
               "class_embed_type": None, "num_class_embeds": None}
TABLE_KEY = "time_embedding.timembedding.0.weight"


def _refuse(what: str) -> ConfigError:
    return ConfigError(f"cannot represent this UNet2DModel: {what}; {SUPPORTED}")


def _levels_with_attention(cfg: Mapping[str, Any]) -> tuple[int, ...]:
    """The attention levels of a diffusers config, checking its block types."""
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if len(down) != len(up) or len(down) != len(cfg["block_out_channels"]):
        raise _refuse(f"{len(down)} down blocks, {len(up)} up blocks, "
                      f"{len(cfg['block_out_channels'])} block_out_channels")
    kinds = {"DownBlock2D": False, "AttnDownBlock2D": True}
    up_kinds = {"UpBlock2D": False, "AttnUpBlock2D": True}
    for name in down + up:
        if name not in kinds and name not in up_kinds:
            raise _refuse(f"block type {name!r}")
    if any(n not in kinds for n in down) or any(n not in up_kinds for n in up):
        raise _refuse(f"down_block_types {down} / up_block_types {up} in the wrong places")
    attn = [kinds[n] for n in down]
    if attn != [up_kinds[n] for n in reversed(up)]:
        raise _refuse(f"up_block_types {up} do not mirror down_block_types {down}")
    return tuple(i for i, a in enumerate(attn) if a)


def _check_one_head(cfg: Mapping[str, Any], widths: list[int], attn: tuple[int, ...]) -> None:
    head_dim = cfg["attention_head_dim"]
    if head_dim is None:
        return
    bad = [w for w in [widths[i] for i in attn] + [widths[-1]] if w != head_dim]
    if bad:
        raise _refuse(f"attention_head_dim={head_dim} gives several heads at width(s) {bad}")


def unet_config_from_diffusers(config: Mapping[str, Any], *, num_time_indices: int = 1000,
                               time_input_scale: float = 1.0) -> UNetConfig:
    """The :class:`UNetConfig` that computes what a ``UNet2DModel`` of ``config`` (its
    ``config.json`` as a mapping) computes, called with our integer index ``i`` where the
    diffusers model gets ``i * time_input_scale``; ``num_time_indices`` rows of the table.
    (A ``"learned"`` model has ``num_train_timesteps`` rows; pass the ``time_input_scale``
    it was exported with: :func:`state_dict_from_diffusers` checks its table against it.)
    Raises :class:`ConfigError` naming the first option we cannot represent."""
    cfg = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, want in _MUST_EQUAL.items():
        if cfg[key] != want:
            raise _refuse(f"{key}={cfg[key]!r} (only {want!r})")
    if cfg["act_fn"] not in ("silu", "swish"):
        raise _refuse(f"act_fn={cfg['act_fn']!r}")
    kind = cfg["time_embedding_type"]
    if kind not in ("positional", "learned"):
        raise _refuse(f"time_embedding_type={kind!r}")
    widths = [int(w) for w in cfg["block_out_channels"]]
    ch = widths[0]
    if any(w % ch for w in widths):
        raise _refuse(f"block_out_channels {widths} are not multiples of the first")
    attn = _levels_with_attention(cfg)
    _check_one_head(cfg, widths, attn)
    if cfg["time_embedding_dim"] not in (None, 4 * ch):
        raise _refuse(f"time_embedding_dim={cfg['time_embedding_dim']} (only 4 * {ch})")
    if cfg["attn_norm_num_groups"] not in (None, cfg["norm_num_groups"]):
        raise _refuse(f"attn_norm_num_groups={cfg['attn_norm_num_groups']} != norm_num_groups")
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse(f"sample_size={size} (square images only)")
        size = size[0]
    if size is None:
        raise _refuse("sample_size is not set")
    if kind == "learned":
        steps = cfg["num_train_timesteps"]
        if not isinstance(steps, int) or not 1 <= steps <= MAX_TIME_INDICES:
            raise _refuse(f"learned time embedding with num_train_timesteps={steps!r}")
        num_time_indices = steps
    freq_shift = float(cfg["freq_shift"])
    try:
        return UNetConfig(
            image_size=size, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
            ch=ch, ch_mult=tuple(w // ch for w in widths), attn=attn,
            num_res_blocks=cfg["layers_per_block"], dropout=cfg["dropout"],
            num_time_indices=num_time_indices, norm_groups=cfg["norm_num_groups"],
            norm_eps=cfg["norm_eps"], downsample_padding=cfg["downsample_padding"],
            freq_shift=freq_shift, time_input_scale=time_input_scale)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"UNet2DModel config out of range: {e}") from None


def diffusers_config_from_unet(config: UNetConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` config (``from_config`` / ``config.json``) of the same network:
    ``"positional"`` when ``time_input_scale == 1`` (called with ``i``, or any fractional
    time), else ``"learned"`` with our table (called with the integer index ``i`` only).
    Refuses class-conditional models (no mapping of their label embedding here)."""
    if not isinstance(config, UNetConfig):
        raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
    if config.num_classes is not None:
        raise ConfigError("cannot export a class-conditional U-Net to UNet2DModel "
                          f"(num_classes={config.num_classes}); unconditional models only")
    levels = len(config.ch_mult)
    down = ["AttnDownBlock2D" if i in config.attn else "DownBlock2D" for i in range(levels)]
    up = [b.replace("Down", "Up") for b in reversed(down)]
    learned = config.time_input_scale != 1.0
    return {
        "sample_size": config.image_size, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "center_input_sample": False,
        "time_embedding_type": "learned" if learned else "positional",
        "time_embedding_dim": None,
        "freq_shift": _plain_number(config.freq_shift),  # unused by diffusers when learned
        "flip_sin_to_cos": False, "down_block_types": down, "mid_block_type": "UNetMidBlock2D",
        "up_block_types": up, "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": config.downsample_padding, "downsample_type": "conv",
        "upsample_type": "conv", "dropout": config.dropout, "act_fn": "silu",
        "attention_head_dim": None, "norm_num_groups": config.norm_groups,
        "attn_norm_num_groups": None, "norm_eps": config.norm_eps,
        "resnet_time_scale_shift": "default", "add_attention": True,
        "class_embed_type": None, "num_class_embeds": None,
        "num_train_timesteps": config.num_time_indices if learned else None,
    }


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _resnet(ours: str, theirs: str, has_shortcut: bool) -> Iterator[tuple[str, str]]:
    names = [("block1.0", "norm1"), ("block1.2", "conv1"), ("temb_proj.1", "time_emb_proj"),
             ("block2.0", "norm2"), ("block2.3", "conv2")]
    if has_shortcut:
        names.append(("shortcut", "conv_shortcut"))
    for a, b in names:
        yield f"{ours}.{a}", f"{theirs}.{b}"


def _attention(ours: str, theirs: str) -> Iterator[tuple[str, str]]:
    for a, b in (("group_norm", "group_norm"), ("proj_q", "to_q"), ("proj_k", "to_k"),
                 ("proj_v", "to_v"), ("proj", "to_out.0")):
        yield f"{ours}.{a}", f"{theirs}.{b}"


def module_pairs(config: UNetConfig) -> list[tuple[str, str]]:
    """``(our module, their module)`` name pairs, each holding a ``weight`` and a ``bias``,
    in our forward order (the time table excepted). Follows :class:`rcfd.core.unet.UNet`'s
    construction, so the shortcut and attention modules are exactly the ones built."""
    c = config
    pairs = [("time_embedding.timembedding.1", "time_embedding.linear_1"),
             ("time_embedding.timembedding.3", "time_embedding.linear_2"), ("head", "conv_in")]
    n, now, skips = 0, c.ch, [c.ch]
    for level, mult in enumerate(c.ch_mult):
        for j in range(c.num_res_blocks):
            pairs += _resnet(f"downblocks.{n}", f"down_blocks.{level}.resnets.{j}",
                             now != c.ch * mult)
            if level in c.attn:
                pairs += _attention(f"downblocks.{n}.attn", f"down_blocks.{level}.attentions.{j}")
            n, now = n + 1, c.ch * mult
            skips.append(now)
        if level != len(c.ch_mult) - 1:
            pairs.append((f"downblocks.{n}.main", f"down_blocks.{level}.downsamplers.0.conv"))
            n += 1
            skips.append(now)
    pairs += _resnet("middleblocks.0", "mid_block.resnets.0", False)
    pairs += _attention("middleblocks.0.attn", "mid_block.attentions.0")
    pairs += _resnet("middleblocks.1", "mid_block.resnets.1", False)
    n = 0
    for k, (level, mult) in enumerate(reversed(list(enumerate(c.ch_mult)))):
        for j in range(c.num_res_blocks + 1):
            pairs += _resnet(f"upblocks.{n}", f"up_blocks.{k}.resnets.{j}",
                             skips.pop() + now != c.ch * mult)
            if level in c.attn:
                pairs += _attention(f"upblocks.{n}.attn", f"up_blocks.{k}.attentions.{j}")
            n, now = n + 1, c.ch * mult
        if level != 0:
            pairs.append((f"upblocks.{n}.main", f"up_blocks.{k}.upsamplers.0.conv"))
            n += 1
    return pairs + [("tail.0", "conv_norm_out"), ("tail.2", "conv_out")]


def _time_columns(ch: int, flip_sin_to_cos: bool) -> torch.Tensor:
    """``perm`` with ``ours[:, c] = theirs[:, perm[c]]`` for the first time Linear: our
    column ``2j`` is ``sin(w_j)``, ``2j + 1`` is ``cos(w_j)``; theirs are ``[sin | cos]``
    halves (``[cos | sin]`` when flipped)."""
    half = ch // 2
    j = torch.arange(half)
    sin, cos = (j + half, j) if flip_sin_to_cos else (j, j + half)
    return torch.stack([sin, cos], dim=1).reshape(ch)


def _is_attention_projection(ours: str) -> bool:
    return ours.rsplit(".", 1)[-1] in ("proj_q", "proj_k", "proj_v", "proj")


def _take(sd: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], side: str):
    if key not in sd:
        raise StateDictMismatchError(f"{side} state dict lacks {key!r}")
    t = sd[key]
    if tuple(t.shape) != shape:
        raise StateDictMismatchError(f"{side} {key!r} has shape {tuple(t.shape)}, the config "
                                     f"needs {shape}")
    return t


def _our_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter shapes, from a model built on the meta device (no allocation)."""
    with torch.device("meta"):
        model = UNet(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_no_extra(sd: Mapping[str, Any], used: set[str], side: str) -> None:
    extra = sorted(set(sd) - used)
    if extra:
        raise StateDictMismatchError(f"{side} state dict has {len(extra)} keys the config "
                                     f"does not explain, e.g. {extra[:3]}")


def state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], config: UNetConfig, *,
                              diffusers_config: Mapping[str, Any] | None = None
                              ) -> dict[str, torch.Tensor]:
    """Our state dict from a ``UNet2DModel`` state dict; ``config`` is what
    :func:`unet_config_from_diffusers` returned, ``diffusers_config`` the model's own
    config (for ``flip_sin_to_cos`` and the time embedding type; diffusers' defaults when
    omitted). Every key and shape is checked against ``config``
    (:class:`StateDictMismatchError` names the first that differs)."""
    dcfg = {**DIFFUSERS_DEFAULTS, **(diffusers_config or {})}
    shapes = _our_shapes(config)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, theirs in module_pairs(config):
        for p in ("weight", "bias"):
            shape = shapes[f"{ours}.{p}"]
            want = shape[:2] if p == "weight" and _is_attention_projection(ours) else shape
            t = _take(sd, f"{theirs}.{p}", want, "diffusers")
            out[f"{ours}.{p}"] = t.reshape(shape)
            used.add(f"{theirs}.{p}")
    table = sinusoidal_table(config.num_time_indices, config.ch, config.freq_shift,
                             config.time_input_scale)
    if dcfg["time_embedding_type"] == "learned":  # our table and layout, as exported
        out[TABLE_KEY] = _learned_table(sd, table)
        used.add("time_proj.weight")
    else:
        out[TABLE_KEY] = table
        key = "time_embedding.timembedding.1.weight"
        out[key] = out[key][:, _time_columns(config.ch, bool(dcfg["flip_sin_to_cos"]))]
    _check_no_extra(sd, used, "diffusers")
    return {k: out[k] for k in shapes}


def _learned_table(sd: Mapping[str, torch.Tensor], table: torch.Tensor) -> torch.Tensor:
    """A learned model's ``time_proj`` table, if it is the sinusoid ``table`` the config
    describes (so that the config, re-exported, describes the model)."""
    theirs = _take(sd, "time_proj.weight", tuple(table.shape), "diffusers")
    if not torch.allclose(theirs.detach().float().cpu(), table, rtol=0, atol=1e-6):
        raise StateDictMismatchError(
            "the learned time table (time_proj.weight) is not the sinusoid of this config; "
            "pass the time_input_scale (and freq_shift) the model was exported with")
    return theirs


def state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], config: UNetConfig
                            ) -> dict[str, torch.Tensor]:
    """The ``UNet2DModel`` state dict (of :func:`diffusers_config_from_unet`'s config) from
    ours; the inverse of :func:`state_dict_from_diffusers` (exact: reshapes and one column
    permutation). Keys and shapes are checked against ``config``."""
    shapes = _our_shapes(config)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in module_pairs(config):
        for p in ("weight", "bias"):
            t = _take(sd, f"{ours}.{p}", shapes[f"{ours}.{p}"], "our")
            if p == "weight" and _is_attention_projection(ours):
                t = t.reshape(t.shape[:2])
            out[f"{theirs}.{p}"] = t
    table = _take(sd, TABLE_KEY, shapes[TABLE_KEY], "our")
    _check_no_extra(sd, set(shapes), "our")
    if diffusers_config_from_unet(config)["time_embedding_type"] == "learned":
        out["time_proj.weight"] = table
    else:  # positional, flip_sin_to_cos=False
        key = "time_embedding.linear_1.weight"
        inverse = torch.argsort(_time_columns(config.ch, False))
        out[key] = out[key][:, inverse]
    return out
