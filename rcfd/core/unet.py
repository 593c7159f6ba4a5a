"""The DDPM U-Net (Ho et al., 2020), state-dict compatible with the reference checkpoints.

Parameter names and shapes follow the widely used PyTorch port of DDPM that the reference
RCFD implementation builds on (``time_embedding.timembedding.{0,1,3}``, ``head``,
``downblocks``, ``middleblocks``, ``upblocks``, ``tail``), so reference checkpoints load
unchanged. The computation is the same; only its execution is modernised: attention runs
through ``F.scaled_dot_product_attention``, channels_last and bf16 autocast work end to end,
and ``forward`` does no host-side work (no ``.item()``, no branching on tensor values), so it
can be captured in a CUDA graph or compiled with ``torch.compile(fullgraph=True)``.

The time input is the integer schedule index ``t * time_scale`` (METHOD.md, "Images and
time"), embedded by a gather from a fixed sinusoidal table of ``num_time_indices`` rows.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from rcfd.config import Decay, NonNegInt, PosInt, Section

NORM_GROUPS = 32  # GroupNorm groups of the reference network
NORM_EPS = 1e-5  # GroupNorm eps of the reference network (torch's default)
MAX_WIDTH = 8192  # channels of one level (ch * ch_mult)
MAX_IMAGE_SIZE = 4096
MAX_TIME_INDICES = 1 << 20


class UNetConfig(Section):
    """Architecture of a :class:`UNet`. ``attn`` lists the resolution *levels* (indices into
    ``ch_mult``; level ``i`` works at ``image_size / 2**i``) whose residual blocks carry
    self-attention. ``num_time_indices`` is the number of rows of the time table: a model
    of a ``(T, time_scale)`` lineage needs ``T * time_scale + 1``. ``out_channels`` defaults
    to ``in_channels``. Sizes are bounded (:data:`MAX_WIDTH` channels, :data:`MAX_IMAGE_SIZE`
    pixels, :data:`MAX_TIME_INDICES` rows) so that a config read from a file cannot ask for
    an absurd allocation.

    The last five fields exist so that diffusers' ``UNet2DModel`` maps onto this network
    weight for weight (``rcfd.interop.diffusers_unet``); their defaults are the reference
    network. ``norm_groups`` / ``norm_eps``: every GroupNorm. ``downsample_padding``: 1 is
    a stride-2 conv with padding 1; 0 pads right and bottom by one, then a stride-2 conv
    with no padding (diffusers' ``downsample_padding=0``). ``freq_shift``: the time table's
    frequencies are ``w_j = 10000 ** (-j / (ch/2 - freq_shift))`` (ours is 0, diffusers'
    DDPM model 1). ``time_input_scale``: row ``i`` of the table embeds the time
    ``i * time_input_scale``, so the model is still called with the integer index ``i`` but
    computes what a network trained on the time ``i * time_input_scale`` would."""

    image_size: Annotated[PosInt, Field(le=MAX_IMAGE_SIZE)] = 32
    in_channels: Annotated[PosInt, Field(le=64)] = 3
    ch: Annotated[PosInt, Field(le=MAX_WIDTH)] = 128
    ch_mult: Annotated[tuple[Annotated[PosInt, Field(le=64)], ...], Field(min_length=1, max_length=8)] = (1, 2, 2, 2)
    attn: tuple[NonNegInt, ...] = (1,)
    num_res_blocks: Annotated[PosInt, Field(le=16)] = 2
    dropout: Decay = 0.1
    num_time_indices: Annotated[PosInt, Field(le=MAX_TIME_INDICES)] = 1025
    num_classes: Annotated[PosInt, Field(le=100_000)] | None = None
    out_channels: Annotated[PosInt, Field(le=64)] | None = None
    norm_groups: Annotated[PosInt, Field(le=1024)] = NORM_GROUPS
    norm_eps: Annotated[float, Field(gt=0, le=0.1)] = NORM_EPS
    downsample_padding: Literal[0, 1] = 1
    freq_shift: Annotated[float, Field(ge=0, le=16)] = 0.0
    time_input_scale: Annotated[float, Field(gt=0, le=1e4)] = 1.0

    @model_validator(mode="after")
    def _check(self) -> "UNetConfig":
        if self.out_channels is None:  # frozen: resolve the default once
            object.__setattr__(self, "out_channels", self.in_channels)
        g = self.norm_groups
        for m in self.ch_mult:
            if (self.ch * m) % g or self.ch * m > MAX_WIDTH:
                raise ValueError(
                    f"ch * ch_mult = {self.ch} * {m} must be a multiple of {g} "
                    f"(GroupNorm groups) and at most {MAX_WIDTH}; use ch = 32, 64, 128, ..."
                )
        if self.ch % g:
            raise ValueError(f"ch={self.ch} must be a multiple of norm_groups={g}")
        if self.ch % 2 or self.ch // 2 - self.freq_shift <= 0:
            raise ValueError(f"the time table needs an even ch and freq_shift < ch / 2, "
                             f"got ch={self.ch}, freq_shift={self.freq_shift}")
        levels = len(self.ch_mult)
        if any(a >= levels for a in self.attn):
            raise ValueError(
                f"attn levels must be indices into ch_mult (0..{levels - 1}), got {self.attn}"
            )
        object.__setattr__(self, "attn", tuple(sorted(set(self.attn))))
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size={self.image_size} must be divisible by 2**(len(ch_mult) - 1) = "
                f"{2 ** (levels - 1)} (one halving per level after the first)"
            )
        return self

    @classmethod
    def cifar10(cls, **overrides: Any) -> "UNetConfig":
        """The reference CIFAR-10 network: 35,877,507 parameters (time table included),
        ``T = 1024`` base model (a time table of 1025 rows)."""
        return cls(**overrides)

    @classmethod
    def digits(cls, **overrides: Any) -> "UNetConfig":
        """A small network for 16x16 one-channel digits that trains on a CPU in minutes:
        levels at 16, 8 and 4 pixels, attention at 8x8."""
        base = cls(image_size=16, in_channels=1, ch=32, ch_mult=(1, 2, 2), attn=(1,),
                   num_res_blocks=1, dropout=0.1, num_time_indices=1025)
        return base.replace(**overrides)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], *, image_size: int = 32,
                        dropout: float = 0.0) -> "UNetConfig":
        """Infer the architecture from a state dict of this layout (a reference checkpoint
        stores no config). ``image_size`` and ``dropout`` leave no trace in the weights and
        are given. Load the state dict strictly afterwards to confirm the inference."""
        def shape(key: str) -> tuple[int, ...]:
            if key not in state_dict:
                raise ValueError(f"not a DDPM U-Net state dict: key {key!r} is missing")
            return tuple(state_dict[key].shape)

        num_time_indices, ch = shape("time_embedding.timembedding.0.weight")
        in_channels = shape("head.weight")[1]
        out_channels = shape("tail.2.weight")[0]
        blocks = sorted({int(m.group(1)) for k in state_dict
                         if (m := re.match(r"downblocks\.(\d+)\.", k))})
        levels: list[list[int]] = [[]]  # per level: block indices
        for i in blocks:
            if f"downblocks.{i}.main.weight" in state_dict:
                levels.append([])
            else:
                levels[-1].append(i)
        counts = {len(lv) for lv in levels}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(f"unequal residual blocks per level in downblocks: {levels}")
        ch_mult = []
        for lv in levels:
            out = shape(f"downblocks.{lv[0]}.block1.2.weight")[0]
            if out % ch:
                raise ValueError(f"level width {out} is not a multiple of ch={ch}")
            ch_mult.append(out // ch)
        attn = [n for n, lv in enumerate(levels) if f"downblocks.{lv[0]}.attn.proj_q.weight"
                in state_dict]
        num_classes = shape("y_embedding.weight")[1] if "y_embedding.weight" in state_dict else None
        return cls(image_size=image_size, in_channels=in_channels, ch=ch, ch_mult=tuple(ch_mult),
                   attn=tuple(attn), num_res_blocks=counts.pop(), dropout=dropout,
                   num_time_indices=num_time_indices, num_classes=num_classes,
                   out_channels=out_channels)


def sinusoidal_table(num_indices: int, dim: int, freq_shift: float = 0.0,
                     scale: float = 1.0) -> torch.Tensor:
    """Transformer position table (Vaswani et al., 2017, sec. 3.5) in DDPM's interleaved
    layout: row ``i``, columns ``2j`` and ``2j + 1`` hold ``sin(s i w_j)`` and
    ``cos(s i w_j)`` with ``w_j = 10000 ** (-2j / (dim - 2 freq_shift))`` and ``s = scale``
    (the defaults are DDPM's table; diffusers' ``freq_shift`` and a time scale give its
    ``get_timestep_embedding`` at ``i * scale``, up to the column order). Computed in
    float64, returned as float32."""
    if dim % 2:
        raise ValueError(f"the time-table width must be even, got {dim}")
    if dim - 2 * freq_shift <= 0:
        raise ValueError(f"freq_shift must be below dim / 2 = {dim // 2}, got {freq_shift}")
    w = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64)
                  / (dim - 2 * freq_shift))
    index = torch.arange(num_indices, dtype=torch.float64)
    if scale != 1.0:
        index = index * scale
    angle = index[:, None] * w[None, :]
    return torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(num_indices, dim).float()


class TimeEmbedding(nn.Module):
    """Schedule index -> ``[B, tdim]``: table gather, Linear, SiLU, Linear."""

    def __init__(self, num_indices: int, ch: int, tdim: int, freq_shift: float = 0.0,
                 scale: float = 1.0):
        super().__init__()
        table = sinusoidal_table(num_indices, ch, freq_shift, scale)
        self.timembedding = nn.Sequential(
            nn.Embedding.from_pretrained(table, freeze=True),
            nn.Linear(ch, tdim),
            nn.SiLU(),
            nn.Linear(tdim, tdim),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.timembedding(t)


class DownSample(nn.Module):
    """Stride-2 3x3 conv. ``padding=1`` pads every side (DDPM); ``padding=0`` pads only the
    right and bottom by one pixel first (diffusers' ``downsample_padding=0``)."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.pad_right_bottom = padding == 0
        self.main = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.pad_right_bottom:
            x = F.pad(x, (0, 1, 0, 1))
        return self.main(x)


class UpSample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.main = nn.Conv2d(ch, ch, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``H*W`` positions with a residual:
    ``x + proj(softmax(q k^T / sqrt(C)) v)``, ``q, k, v = proj_{q,k,v}(GroupNorm(x))``.
    The projections keep the reference's 1x1-conv parameters; they are applied as linear
    maps on ``[B, HW, C]`` tokens, which is the same product and hands
    ``scaled_dot_product_attention`` contiguous inputs whatever the memory format."""

    def __init__(self, ch: int, groups: int = NORM_GROUPS, eps: float = NORM_EPS):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=eps)
        self.proj_q = nn.Conv2d(ch, ch, 1)
        self.proj_k = nn.Conv2d(ch, ch, 1)
        self.proj_v = nn.Conv2d(ch, ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    @staticmethod
    def _linear(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (self._linear(p, tokens).unsqueeze(1)
                   for p in (self.proj_q, self.proj_k, self.proj_v))  # [B, 1, HW, C]
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        h = self._linear(self.proj, h)  # [B, HW, C]
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class ResBlock(nn.Module):
    """``h = block1(x) + temb_proj(temb)``; ``out = attn(block2(h) + shortcut(x))``."""

    def __init__(self, in_ch: int, out_ch: int, tdim: int, dropout: float, attn: bool,
                 groups: int = NORM_GROUPS, eps: float = NORM_EPS):
        super().__init__()
        self.block1 = nn.Sequential(
            nn.GroupNorm(groups, in_ch, eps=eps), nn.SiLU(),
            nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(tdim, out_ch))
        self.block2 = nn.Sequential(
            nn.GroupNorm(groups, out_ch, eps=eps), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch, groups, eps) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.temb_proj(temb)[:, :, None, None]
        h = self.block2(h) + self.shortcut(x)
        return self.attn(h)


class UNet(nn.Module):
    """``model(x, t, y=None) -> [B, out_channels, H, W]``: ``x`` is ``[B, C, H, W]``, ``t``
    the integer schedule index (``[B]`` or a 0-dim tensor), ``y`` the integer class label
    ``[B]`` when ``config.num_classes`` is set. What the output means (x0 or eps) is the
    caller's convention, recorded in the checkpoint."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = c = config
        tdim = 4 * c.ch
        self.time_embedding = TimeEmbedding(c.num_time_indices, c.ch, tdim, c.freq_shift,
                                            c.time_input_scale)
        norm = {"groups": c.norm_groups, "eps": c.norm_eps}
        # Reference name and layout: a Linear on one-hot labels, applied here as a gather.
        self.y_embedding = nn.Linear(c.num_classes, tdim) if c.num_classes else None
        self.head = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)

        skip_chs, now = [c.ch], c.ch
        self.downblocks = nn.ModuleList()
        for level, mult in enumerate(c.ch_mult):
            for _ in range(c.num_res_blocks):
                self.downblocks.append(
                    ResBlock(now, c.ch * mult, tdim, c.dropout, attn=level in c.attn, **norm))
                now = c.ch * mult
                skip_chs.append(now)
            if level != len(c.ch_mult) - 1:
                self.downblocks.append(DownSample(now, c.downsample_padding))
                skip_chs.append(now)
        self.middleblocks = nn.ModuleList([
            ResBlock(now, now, tdim, c.dropout, attn=True, **norm),
            ResBlock(now, now, tdim, c.dropout, attn=False, **norm),
        ])
        self.upblocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.ch_mult))):
            for _ in range(c.num_res_blocks + 1):
                self.upblocks.append(ResBlock(skip_chs.pop() + now, c.ch * mult, tdim,
                                              c.dropout, attn=level in c.attn, **norm))
                now = c.ch * mult
            if level != 0:
                self.upblocks.append(UpSample(now))
        self.tail = nn.Sequential(
            nn.GroupNorm(c.norm_groups, now, eps=c.norm_eps), nn.SiLU(),
            nn.Conv2d(now, c.out_channels, 3, padding=1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DDPM initialisation: Xavier-uniform weights, zero biases, and a gain of 1e-5 on
        the last layer of every residual branch and of the network, so each block starts
        near the identity and the output near zero."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.xavier_uniform_(m.block2[-1].weight, gain=1e-5)
            elif isinstance(m, AttnBlock):
                nn.init.xavier_uniform_(m.proj.weight, gain=1e-5)
        nn.init.xavier_uniform_(self.tail[-1].weight, gain=1e-5)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """All parameters, as the reference counts them (the frozen time table included),
        or only those with ``requires_grad``."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        if t.is_floating_point():
            raise TypeError("t must be an integer schedule index tensor (t * time_scale), "
                            f"got dtype {t.dtype}; pass t.long()")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.time_embedding(t)
        if self.y_embedding is not None:
            if y is None:
                raise ValueError("this UNet is class-conditional (num_classes="
                                 f"{self.config.num_classes}): pass labels y of shape [B]")
            temb = temb + self.y_embedding.weight.index_select(1, y).t() + self.y_embedding.bias
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes=None): pass y=None")
        h = self.head(x)
        skips = [h]
        for layer in self.downblocks:
            h = layer(h, temb)
            skips.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        for layer in self.upblocks:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, temb)
        return self.tail(h)
