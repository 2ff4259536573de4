"""DermoSegDiff (teacher) and LiteDermoSegDiff (student): one dual-branch U-Net, presets by depth.

`eps = net(x_t, g, t)`: x_t the noisy mask (1 channel, in [-1, 1]), g the RGB image, t the
integer step. The x branch carries the mask, the g branch the image; at every encoder stage
the image features gate the mask features (conv1x1(g) * x) and both feed the skips.
Architecture as in the DermoSegDiff paper; a student is a teacher with its last stages removed.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.diffusion import PREDICTION_TYPES, NoiseSchedule

__all__ = ["Preset", "PRESETS", "DermoSegDiff", "build", "preset", "list_presets", "count_params", "flops_per_call",
           "stage_outputs"]


# ----------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """Everything needed to rebuild a network: saved next to every checkpoint as JSON."""

    name: str
    dim_x: int
    dim_g: int
    dim_x_mults: tuple[int, ...]
    dim_g_mults: tuple[int, ...]
    groups: int
    role: str = "student"  # "teacher" or "student"
    image_size: int = 128
    prediction_type: str = "epsilon"  # "epsilon" (paper), "sample" (x0) or "v_prediction"
    teacher: str | None = None  # the preset a student is distilled from
    heads: int = 4  # attention heads and width per head (paper: 4 x 32)
    dim_head: int = 32
    # "paper": GroupNorm + SiLU blocks and linear attention at every stage (DermoSegDiff).
    # "mobile": BatchNorm + ReLU blocks, linear attention in the bottleneck only: at export every block
    # (with its time scale/shift) folds into one conv + ReLU, close to a plain U-Net's cost per FLOP.
    blocks: str = "paper"
    note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _check_preset(self)

    @property
    def stages(self) -> int:
        return len(self.dim_x_mults)

    def to_dict(self) -> dict:
        return asdict(self)

    def architecture(self) -> dict:
        """The fields that shape the weights (what two checkpoints of one preset must share)."""
        return {k: v for k, v in self.to_dict().items() if k in _ARCH_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "Preset":
        """A preset from its JSON form; ValueError naming the field for any wrong type or range."""
        if not isinstance(d, dict):
            raise ValueError(f"a preset must be a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__} | set(REMOVED_FIELDS)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preset fields {sorted(unknown)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in d and f.default is MISSING
                         and f.default_factory is MISSING)
        if missing:
            raise ValueError(f"preset fields missing: {missing}")
        d = _without_removed_fields(d)
        for k in ("dim_x_mults", "dim_g_mults"):
            if not isinstance(d[k], (list, tuple)):
                raise ValueError(f"{k} must be a list of integers, got {d[k]!r}")
            d[k] = tuple(d[k])
        return cls(**d)

    def with_depth(self, stages: int, name: str, **kw) -> "Preset":
        """The same network cut to its first `stages` stages (the paper's student design)."""
        base = dict(self.to_dict(), name=name, role="student", teacher=self.name, **kw)
        base["dim_x_mults"] = self.dim_x_mults[:stages]
        base["dim_g_mults"] = self.dim_g_mults[:stages]
        return Preset(**{k: v for k, v in base.items()})


#: Preset (and checkpoint) names: a letter or digit, then letters, digits, '.', '_' or '-'; no
#: path separators, so a name taken from a checkpoint's JSON is safe to use in a file name.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BLOCKS = ("paper", "mobile")
_ARCH_FIELDS = ("dim_x", "dim_g", "dim_x_mults", "dim_g_mults", "groups", "image_size", "heads", "dim_head",
                "blocks")
#: Fields of earlier presets, read at their default (checkpoints written then carry them) and
#: refused otherwise: field -> (default, what it was, the commit whose code runs such a model).
REMOVED_FIELDS = {
    "low_res_attention": (0, "linear attention at the lowest-resolution stages of mobile blocks", "3a06f44"),
}


def _without_removed_fields(d: dict) -> dict:
    out = dict(d)
    for name, (default, what, commit) in REMOVED_FIELDS.items():
        if name in out and out.pop(name) != default:
            raise ValueError(f"{name} = {d[name]!r} ({what}) is no longer supported; edgeseg at commit {commit} "
                             "builds and runs such a model")
    return out
# Upper bounds far above every shipped preset (the paper teacher: width 64 x 6 stages, 1024 image
# channels), so a typo or an edited JSON cannot ask for gigabytes before anything is checked.
_MAX = {"dim": 2048, "mult": 64, "stages": 8, "heads": 64, "dim_head": 1024, "image_size": 4096}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_name(name, what: str = "preset name") -> str:
    """`name` if it is a valid preset name, else ValueError (no '/', '..', spaces or control characters)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"{what} must be 1-64 letters, digits, '.', '_' or '-' starting with a letter "
                         f"or digit, got {name!r}")
    return name


def _check_preset(p: "Preset") -> None:
    check_name(p.name)
    if p.teacher is not None:
        check_name(p.teacher, "teacher preset name")
    for k, hi in (("dim_x", _MAX["dim"]), ("dim_g", _MAX["dim"]), ("groups", _MAX["dim"]),
                  ("heads", _MAX["heads"]), ("dim_head", _MAX["dim_head"]), ("image_size", _MAX["image_size"])):
        v = getattr(p, k)
        if not _is_int(v) or not 1 <= v <= hi:
            raise ValueError(f"{k} must be an integer from 1 to {hi}, got {v!r}")
    for k in ("dim_x_mults", "dim_g_mults"):
        v = getattr(p, k)
        if not isinstance(v, tuple) or not 1 <= len(v) <= _MAX["stages"] or not all(
                _is_int(m) and 1 <= m <= _MAX["mult"] for m in v):
            raise ValueError(f"{k} must be 1 to {_MAX['stages']} integers from 1 to {_MAX['mult']}, got {v!r}")
    if len(p.dim_x_mults) != len(p.dim_g_mults):
        raise ValueError(f"dim_x_mults {list(p.dim_x_mults)} and dim_g_mults {list(p.dim_g_mults)} must have "
                         "the same length (one per stage)")
    widths = [p.dim_x, p.dim_g] + [p.dim_x * m for m in p.dim_x_mults] + [p.dim_g * m for m in p.dim_g_mults]
    bad = sorted({w for w in widths if w % p.groups})
    if bad:
        raise ValueError(f"groups {p.groups} must divide every stage width (not {bad[0]})")
    if p.image_size % 2 ** (len(p.dim_x_mults) - 1):
        raise ValueError(f"image_size {p.image_size} must be divisible by {2 ** (len(p.dim_x_mults) - 1)} "
                         f"({len(p.dim_x_mults)} stages halve it {len(p.dim_x_mults) - 1} times)")
    if p.role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {p.role!r}")
    if p.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {p.prediction_type!r}")
    if p.blocks not in BLOCKS:
        raise ValueError(f"blocks must be one of {', '.join(BLOCKS)}, got {p.blocks!r}")
    if not isinstance(p.note, str):
        raise ValueError(f"note must be a string, got {p.note!r}")


def _paper(dataset: str, x_mults, g_mults) -> list[Preset]:
    teacher = Preset(f"teacher-{dataset}", 64, 32, tuple(x_mults), tuple(g_mults), 8, role="teacher")
    out = [teacher]
    for stages, name in ((5, f"student5-{dataset}"), (4, f"student4-{dataset}"), (3, f"student-{dataset}")):
        out.append(teacher.with_depth(stages, name, groups=4 if stages == 3 else 8))
    return out


_ALL: list[Preset] = [
    *_paper("isic2018", (1, 2, 3, 4, 5, 6), (1, 2, 4, 8, 16, 32)),
    *_paper("ham10000", (2, 2, 2, 2, 2, 2), (1, 2, 4, 8, 16, 32)),
    # Compute-lean phone student: the 3-stage depth cut of the ISIC teacher at a quarter of the
    # width. FLOPs at the full-resolution stages scale with width^2, so this is the lever. It predicts
    # x0 ("sample"): a phone runs 1-2 DDIM steps, where epsilon models fail (a small synthetic test;
    # bench/README.md); the epsilon teacher's outputs are re-expressed as x0 during distillation.
    # Mobile blocks: the export is convs, as in a plain U-Net (README, "Mobile blocks").
    Preset(
        "student-mobile", 16, 8, (1, 2, 3), (1, 2, 4), 4, role="student", teacher="teacher-isic2018",
        prediction_type="sample", dim_head=16, blocks="mobile", note="<= 5 GFLOP per call at 128x128",
    ),
    # CPU presets for the demo, CI and tests: 64x64, x0 prediction (good at 1-4 DDIM steps) and
    # 2 x 16 attention, chosen by measurement on 2 cores (README, "Tiny presets").
    Preset("tiny-teacher", 16, 8, (1, 2, 3, 4), (1, 2, 4, 8), 4, role="teacher", image_size=64,
           prediction_type="sample", heads=2, dim_head=16),
    Preset("tiny-student", 16, 8, (1, 2, 3), (1, 2, 4), 4, role="student", image_size=64,
           prediction_type="sample", heads=2, dim_head=16, teacher="tiny-teacher"),
    # the tiny pair at 128 px, the paper's input size: the same weights' shapes as the 64-px pair
    # (convolutions and linear attention do not depend on the input size), so the shipped 64-px
    # models are their starting point (`init_from`)
    Preset("tiny-teacher-128", 16, 8, (1, 2, 3, 4), (1, 2, 4, 8), 4, role="teacher", image_size=128,
           prediction_type="sample", heads=2, dim_head=16),
    Preset("tiny-student-128", 16, 8, (1, 2, 3), (1, 2, 4), 4, role="student", image_size=128,
           prediction_type="sample", heads=2, dim_head=16, teacher="tiny-teacher-128"),
    # tiny-student's widths with mobile blocks (BatchNorm + ReLU, linear attention in the bottleneck only):
    # the phone's cost per FLOP of a plain conv net; initialised from the teacher's convolutions
    Preset("tiny-student-mobile", 16, 8, (1, 2, 3), (1, 2, 4), 4, role="student", image_size=64,
           prediction_type="sample", heads=2, dim_head=16, teacher="tiny-teacher", blocks="mobile"),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _ALL}


def list_presets() -> list[str]:
    return list(PRESETS)


def preset(name: str) -> Preset:
    if name not in PRESETS:
        from edgeseg.errors import EdgesegError

        raise EdgesegError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def build(name_or_preset: str | Preset, **overrides) -> "DermoSegDiff":
    """Build a network by preset name (or from a Preset), optionally overriding fields."""
    p = preset(name_or_preset) if isinstance(name_or_preset, str) else name_or_preset
    if overrides:
        p = Preset.from_dict({**p.to_dict(), **overrides})
    return DermoSegDiff(p)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_call(name: str, device: str = "meta") -> tuple[int, torch.Size]:
    """FLOPs of one forward call at the preset's image size, batch 1 (2 FLOPs per multiply-add).

    On the meta device the counter sees the same ops and shapes without computing anything.
    """
    from torch.utils.flop_counter import FlopCounterMode

    s = preset(name).image_size
    with torch.device(device):
        model = build(name).eval()
        x, g, t = torch.randn(1, 1, s, s), torch.randn(1, 3, s, s), torch.tensor([10])
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = model(x, g, t)
    return fc.get_total_flops(), out.shape


# ----------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------
class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


def time_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, 4 * dim))


class WSConv2d(nn.Conv2d):
    """Weight-standardised conv (per output channel); folded into a plain conv for export."""

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        eps = 1e-5 if w.dtype == torch.float32 else 1e-3
        wf = w.float()
        mean = wf.mean(dim=(1, 2, 3), keepdim=True)
        var = wf.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return ((wf - mean) * torch.rsqrt(var + eps)).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding)


class Block(nn.Module):
    """conv3x3 -> norm -> time scale/shift -> activation; `mobile`: BatchNorm and ReLU (foldable)."""

    def __init__(self, dim: int, dim_out: int, groups: int, mobile: bool = False):
        super().__init__()
        # weight standardisation presumes a norm that sees the activations at inference too
        self.proj = (nn.Conv2d(dim, dim_out, 3, padding=1, bias=False) if mobile
                     else WSConv2d(dim, dim_out, 3, padding=1))
        self.norm = nn.BatchNorm2d(dim_out) if mobile else nn.GroupNorm(groups, dim_out)
        self.act = nn.ReLU() if mobile else nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int, groups: int, mobile: bool = False):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups, mobile)
        self.block2 = Block(dim_out, dim_out, groups, mobile)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, temb):
        scale_shift = self.mlp(temb)[:, :, None, None].chunk(2, dim=1)
        h = self.block2(self.block1(x, scale_shift))
        return h + self.res_conv(x)


class LinearAttention(nn.Module):
    """Efficient attention: q softmax over channels, k over positions (all softmaxes on the last dim)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x):
        b, _, h, w = x.shape
        n, hd, dh = h * w, self.heads, self.dim_head
        q, k, v = self.to_qkv(x).reshape(b, 3, hd, dh, n).unbind(1)  # each b hd dh n
        q = q.transpose(-1, -2).softmax(dim=-1) * self.scale  # b hd n dh, softmax over channels
        k = k.softmax(dim=-1)  # softmax over positions
        context = k @ v.transpose(-1, -2)  # b hd dh(d) dh(e)
        out = q @ context  # b hd n e
        out = out.transpose(-1, -2).reshape(b, hd * dh, h, w)
        return self.to_out(out)


class Attention(nn.Module):
    """Full softmax attention over positions (the bottleneck's global context)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        n, hd, dh = h * w, self.heads, self.dim_head
        q, k, v = self.to_qkv(x).reshape(b, 3, hd, dh, n).unbind(1)
        sim = (q.transpose(-1, -2) * self.scale) @ k  # b hd n n
        attn = sim.softmax(dim=-1)
        out = attn @ v.transpose(-1, -2)  # b hd n dh
        return self.to_out(out.transpose(-1, -2).reshape(b, hd * dh, h, w))


class PreNormResidual(nn.Module):
    """Residual(PreNorm(GroupNorm(1), fn))."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.GroupNorm(1, dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x)) + x


class Downsample(nn.Module):
    """Space-to-depth 2x2 then a 1x1 conv."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim * 4, dim_out, 1)

    def forward(self, x):
        return self.conv(F.pixel_unshuffle(x, 2))


def upsample(dim: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1))


def stage_attention(dim: int, attn) -> nn.Module:
    """An encoder/decoder stage's linear attention (`attn` = (heads, dim_head)), or none (`attn` None)."""
    return nn.Identity() if attn is None else PreNormResidual(dim, LinearAttention(dim, *attn))


class EncoderStage(nn.Module):
    def __init__(self, dx, dg, dx_next, dg_next, tx, tg, groups, last: bool, attn=(4, 32), mobile: bool = False):
        super().__init__()
        self.rb_x1 = ResBlock(dx, dx, tx, groups, mobile)
        self.rb_g1 = ResBlock(dg, dg, tg, groups, mobile)
        self.rb_g2 = ResBlock(dg + dx, dg, tg, groups, mobile)
        self.gate = nn.Conv2d(dg, dx, 1)
        self.rb_x2 = ResBlock(dx, dx, tx, groups, mobile)
        self.attn_x = stage_attention(dx, attn)
        self.attn_g = stage_attention(dg + dx, attn)
        if last:
            self.down_x = nn.Conv2d(dx, dx_next, 3, padding=1)
            self.down_g = nn.Conv2d(dg + dx, dg_next, 3, padding=1)
        else:
            self.down_x = Downsample(dx, dx_next)
            self.down_g = Downsample(dg + dx, dg_next)

    def forward(self, x, g, tx, tg):
        x = self.rb_x1(x, tx)
        g = self.rb_g1(g, tg)
        g = torch.cat([x, g], dim=1)
        h = g
        g = self.rb_g2(g, tg)
        x = self.rb_x2(self.gate(g) * x, tx)
        x = self.attn_x(x)
        g = torch.cat([x, g], dim=1)
        b = g
        g = self.attn_g(g)
        return self.down_x(x), self.down_g(g), h, b


class DecoderStage(nn.Module):
    def __init__(self, dx, dskip, dx_out, tx, groups, last: bool, attn=(4, 32), mobile: bool = False):
        super().__init__()
        self.rb1 = ResBlock(dx + dskip, dx, tx, groups, mobile)
        self.rb2 = ResBlock(dx + dskip, dx, tx, groups, mobile)
        self.attn = stage_attention(dx, attn)
        self.up = nn.Conv2d(dx, dx_out, 3, padding=1) if last else upsample(dx, dx_out)

    def forward(self, x, h, b, tx):
        x = self.rb1(torch.cat([x, b], dim=1), tx)
        x = self.rb2(torch.cat([x, h], dim=1), tx)
        return self.up(self.attn(x))


class Bottleneck(nn.Module):
    """RB(cat(x, g)) -> full attention and linear attention in parallel -> cat -> RB.

    Mobile blocks keep the linear attention only: the full attention's n x n matrix (at 128 px,
    32 x 32 positions, 4 heads, N = 3: 50 MB in fp32) is the phone program's largest tensor."""

    def __init__(self, dx, dg, tx, groups, attn=(4, 32), mobile: bool = False):
        super().__init__()
        self.rb1 = ResBlock(dx + dg, dx, tx, groups, mobile)
        self.attn = nn.Identity() if mobile else PreNormResidual(dx, Attention(dx, *attn))
        self.lin_attn = PreNormResidual(dx, LinearAttention(dx, *attn))
        self.rb2 = ResBlock(2 * dx, dx, tx, groups, mobile)

    def forward(self, x, g, tx):
        x = self.rb1(torch.cat([x, g], dim=1), tx)
        x = torch.cat([self.attn(x), self.lin_attn(x)], dim=1)
        return self.rb2(x, tx)


# ----------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------
class DermoSegDiff(nn.Module):
    """Dual-branch conditional denoiser. `forward(x_t, g, t)` returns the prediction (eps/x0/v)."""

    def __init__(self, p: Preset):
        super().__init__()
        self.preset = p
        self.noise_schedule = NoiseSchedule()  # saved with the weights; load_model restores it
        dims_x = [p.dim_x] + [p.dim_x * m for m in p.dim_x_mults]
        dims_g = [p.dim_g] + [p.dim_g * m for m in p.dim_g_mults]
        tx, tg = 4 * p.dim_x, 4 * p.dim_g
        n = len(p.dim_x_mults)
        attn = (p.heads, p.dim_head)
        mobile = p.blocks == "mobile"
        if len(p.dim_g_mults) != n:
            raise ValueError("dim_x_mults and dim_g_mults must have the same length (one per stage)")
        self.time_x = time_mlp(p.dim_x)
        self.time_g = time_mlp(p.dim_g)
        self.init_x = nn.Conv2d(1, p.dim_x, 1)
        self.init_g = nn.Conv2d(3, p.dim_g, 1)
        self.downs = nn.ModuleList(
            EncoderStage(dims_x[i], dims_g[i], dims_x[i + 1], dims_g[i + 1], tx, tg, p.groups, last=i == n - 1,
                         attn=self.stage_attn(i), mobile=mobile)
            for i in range(n)
        )
        self.mid = Bottleneck(dims_x[-1], dims_g[-1], tx, p.groups, attn, mobile)
        self.ups = nn.ModuleList(
            DecoderStage(dims_x[i + 1], dims_x[i] + dims_g[i], dims_x[i], tx, p.groups, last=i == 0,
                         attn=self.stage_attn(i), mobile=mobile)
            for i in reversed(range(n))
        )
        self.final_block = ResBlock(2 * p.dim_x + p.dim_g, p.dim_x, tx, groups=1, mobile=mobile)
        self.final_conv = nn.Conv2d(p.dim_x, 1, 1)

    def stage_attn(self, i: int) -> tuple[int, int] | None:
        """Stage i's linear attention (heads, dim_head), or None: paper blocks have it at every stage,
        mobile blocks in the bottleneck only (in the exported program its softmaxes, batch matmuls
        and transposes at full resolution cost more than the stage's convs)."""
        p = self.preset
        if p.blocks == "mobile":
            return None
        return p.heads, p.dim_head

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.downs) - 1)

    def forward(self, x_t: torch.Tensor, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoise(x_t, g, self.time_x(t), self.time_g(t))

    def denoise(self, x_t: torch.Tensor, g: torch.Tensor, tx: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
        """The network given precomputed time embeddings (exported programs store them as constants)."""
        x, gg = self.init_x(x_t), self.init_g(g)
        r_x, r_g = x, gg
        skips = []
        for stage in self.downs:
            x, gg, h, b = stage(x, gg, tx, tg)
            skips.append((h, b))
        x = self.mid(x, gg, tx)
        for stage in self.ups:
            h, b = skips.pop()
            x = stage(x, h, b, tx)
        x = self.final_block(torch.cat([x, r_x, r_g], dim=1), tx)
        return self.final_conv(x)


@contextlib.contextmanager
def stage_outputs(net: DermoSegDiff) -> Iterator[dict[str, torch.Tensor]]:
    """Record what every stage of `net` computes in the forward calls made inside the block.

    Keys name the place by resolution level, so a student and its deeper teacher share them:
    ``enc{i}.h`` / ``enc{i}.b`` the two skips of encoder level i, ``mid`` the bottleneck,
    ``dec{i}`` the output of the decoder stage at level i (a later call overwrites an earlier one).
    """
    out: dict[str, torch.Tensor] = {}

    def keep(*names):
        def hook(_module, _inputs, result):
            values = result[2:] if isinstance(result, tuple) else (result,)  # an encoder stage: its skips
            out.update(zip(names, values))
        return hook

    taps = [(stage, keep(f"enc{i}.h", f"enc{i}.b")) for i, stage in enumerate(net.downs)]
    taps.append((net.mid, keep("mid")))
    taps += [(stage, keep(f"dec{len(net.ups) - 1 - j}")) for j, stage in enumerate(net.ups)]
    handles = [module.register_forward_hook(hook) for module, hook in taps]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
