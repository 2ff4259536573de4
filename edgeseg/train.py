"""One trainer for teacher and student: Adam, ReduceLROnPlateau, EMA, checkpoints, resume, DDP.

Objectives (the paper's Eq. 1-7):
  teacher  1.0 L2 + 0.25 boundary
  student  1.0 L2 + 0.25 KD + 0.25 boundary, KD = "efkd" (default) | "global" | "none"
The student's loss goes through `distill_loss`, the single dispatch point: with EFKD it calls
`edgeseg.kernels.fused_distill_loss(backend="auto")`, the fused Triton kernel on CUDA.

Determinism: per-step timesteps and noise are drawn for the whole *global* batch from one
generator whose state is checkpointed, and each rank takes its own rows; data order comes from a
DistributedSampler seeded per epoch (also with one process). So a resumed run continues
bit-exactly on CPU, and a torchrun run matches a single-process run on the same global batch.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from edgeseg.checkpoint import atomic_write_json, load_model, save_model, save_tensors
from edgeseg.errors import EdgesegError, SettingsError
from edgeseg.losses import efkd_loss, feature_kd_loss, student_objective, teacher_objective, x0_segmentation_loss
from edgeseg.models import DermoSegDiff, Preset, WSConv2d, build, preset, stage_outputs

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "distill_loss", "EMA", "paper_recipe", "tiny_recipe",
           "validate_settings", "read_state_config", "FIXED_ON_RESUME"]


class TrainingDiverged(EdgesegError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every training setting; `edgeseg distill --help` documents each one."""

    role: str = "student"  # "teacher" or "student"
    preset: str = "tiny-student"
    dataset: str = "synthetic"
    data_dir: str | None = None
    # objective
    kd: str = "efkd"  # "efkd", "global" or "none" (students only)
    tau: float = 0.6
    lambda_e: float = 5.0
    lambda_b: float = 2.0
    w_l2: float = 1.0
    w_kd: float = 0.25
    w_boundary: float = 0.25
    # optimisation
    batch_size: int = 16  # global batch, split over ranks
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 2000
    max_steps: int | None = None  # stop after this many optimizer steps (whole run)
    # "plateau": halve (plateau_factor) after plateau_patience epochs without a better validation
    # loss; "cosine": anneal from lr to LR_FLOOR x lr over the run (max_seconds or the steps,
    # whichever ends it first), as the U-Net baseline does
    lr_schedule: str = "plateau"
    plateau_factor: float = 0.5
    plateau_patience: int = 10
    grad_clip: float | None = 1.0
    ema_beta: float = 0.9999
    ema_start: int = 500  # steps before the EMA starts averaging (copies weights until then)
    # data
    augment: bool = True
    num_workers: int = 2
    seed: int = 0
    # validation / checkpoints
    val_every: int = 1  # epochs
    val_max_batches: int | None = None
    save_every_steps: int = 0  # 0: at the end of every epoch only
    bf16: bool = True  # autocast to bf16 where the device supports it (CUDA; CPUs with AVX-512 BF16 / AMX)
    kernel_backend: str = "auto"  # fused loss: "auto", "triton" or "torch"
    init_from_teacher: bool = False  # start the student from the teacher's matching stages
    init_from: str | None = None  # fine-tune: start from this checkpoint's weights (same preset)
    prediction_type: str | None = None  # override the preset's ("epsilon", "sample", "v_prediction")
    max_seconds: float | None = None  # stop after this much training wall time (whole run, over resumes)
    # share of each batch's timesteps drawn at the shipped sampler's timesteps (edgeseg.defaults K
    # for the prediction type) instead of uniformly: a phone runs those few only
    focus_timesteps: float = 0.0
    w_seg: float = 0.0  # students: weight of Dice + BCE on the predicted x0 (losses.x0_segmentation_loss)
    # students: weight of feature distillation on every stage the teacher shares (losses.feature_kd_loss),
    # for a student whose blocks differ from the teacher's (mobile blocks)
    w_feat: float = 0.0
    # students: weight of sampler distillation (losses.efkd_loss on x0): on the rows drawn at the
    # shipped sampler's first timestep (needs focus_timesteps > 0), the student's x0 is pulled toward
    # the teacher's whole sampler output (its K x N ensemble mean from edgeseg.defaults)
    w_sampler_kd: float = 0.0

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SettingsError(f"unknown training settings {unknown}; known: {sorted(names)}")
        return cls(**d)


def validate_settings(role: str, overrides: dict) -> TrainConfig:
    """Check training settings (option values, --set, a settings file) before any work starts:
    SettingsError with one line for the first unknown name, wrong type or value out of range."""
    return TrainConfig.from_dict({**TrainConfig(role=role).to_dict(), **overrides, "role": role})


# setting: (kind, low, high, what the low bound means); kinds: int, int? (None allowed), float, float?
_NUMBERS: dict[str, tuple] = {
    "batch_size": ("int", 1, None), "epochs": ("int", 1, None), "max_steps": ("int?", 1, None),
    "plateau_patience": ("int", 0, None), "ema_start": ("int", 0, None), "num_workers": ("int", 0, 64),
    "seed": ("int", 0, 2**32 - 1), "val_every": ("int", 1, None), "val_max_batches": ("int?", 1, None),
    "save_every_steps": ("int", 0, None),
    "lr": ("float>", 0.0, None), "tau": ("float", 0.0, 1.0), "lambda_e": ("float", 0.0, None),
    "lambda_b": ("float", 0.0, None), "w_l2": ("float", 0.0, None), "w_kd": ("float", 0.0, None),
    "w_boundary": ("float", 0.0, None), "plateau_factor": ("float>", 0.0, 1.0), "ema_beta": ("float", 0.0, 1.0),
    "grad_clip": ("float>?", 0.0, None), "max_seconds": ("float>?", 0.0, None),
    "focus_timesteps": ("float", 0.0, 1.0), "w_seg": ("float", 0.0, None), "w_feat": ("float", 0.0, None),
    "w_sampler_kd": ("float", 0.0, None),
}
_CHOICES = {"role": ("teacher", "student"), "kd": ("efkd", "global", "none"),
            "prediction_type": (None, "epsilon", "sample", "v_prediction"), "kernel_backend": ("auto", "triton", "torch"),
            "lr_schedule": ("plateau", "cosine")}
_BOOLS = ("augment", "bf16", "init_from_teacher")


# settings that are also options of `edgeseg distill` / `train-teacher`
_OPTIONS = ("kd", "tau", "lambda_e", "lambda_b", "epochs", "max_steps", "batch_size", "lr", "seed", "num_workers")


def _bad(name: str, rule: str, value) -> SettingsError:
    label = f"--{name.replace('_', '-')}" if name in _OPTIONS else f"training setting {name}"
    return SettingsError(f"{label} must be {rule}, got {value!r}")


def _number(name: str, v, kind: str, lo, hi):
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if v is None and optional:
        return None
    hi_txt = f" and <= {hi:g}" if hi is not None else ""
    if kind == "int":
        rule = f"an integer >= {lo}{hi_txt}" + (" (leave it out, or null, for no limit)" if optional else "")
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            raise _bad(name, rule, v)
        return v
    strict = kind == "float>"
    rule = f"a finite number {'>' if strict else '>='} {lo:g}" + (f" and {'<' if strict else '<='} {hi:g}"
                                                                   if hi is not None else "")
    if optional:
        rule += " (or null for none)"
    if isinstance(v, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            v = float(v)
        except ValueError:
            raise _bad(name, rule, v) from None
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise _bad(name, rule, v)
    v = float(v)
    ok = math.isfinite(v) and (v > lo if strict else v >= lo)
    if hi is not None:
        ok = ok and (v < hi if strict else v <= hi)
    if not ok:
        raise _bad(name, rule, v)
    return v


def _validate(cfg: "TrainConfig") -> None:
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise _bad(name, "one of " + ", ".join(str(c) for c in choices), getattr(cfg, name))
    for name, (kind, lo, hi) in _NUMBERS.items():
        setattr(cfg, name, _number(name, getattr(cfg, name), kind, lo, hi))
    for name in _BOOLS:
        if not isinstance(getattr(cfg, name), bool):
            raise _bad(name, "true or false", getattr(cfg, name))
    for name in ("preset", "dataset"):
        if not isinstance(getattr(cfg, name), str) or not getattr(cfg, name):
            raise _bad(name, "a name", getattr(cfg, name))
    for name in ("data_dir", "init_from"):
        v = getattr(cfg, name)
        if v is not None and not isinstance(v, str):
            if isinstance(v, os.PathLike):
                setattr(cfg, name, os.fspath(v))
            else:
                raise _bad(name, "a path", v)
    b = cfg.betas
    if (not isinstance(b, (list, tuple)) or len(b) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in b)):
        raise _bad("betas", "two numbers in [0, 1)", b)
    cfg.betas = (float(b[0]), float(b[1]))  # JSON round trips give lists
    if cfg.w_sampler_kd > 0 and (cfg.role != "student" or cfg.focus_timesteps == 0):
        raise _bad("w_sampler_kd", "0 for a teacher, and 0 unless focus_timesteps > 0 (its rows are the ones drawn "
                   "at the sampler's timesteps)", cfg.w_sampler_kd)


#: The cosine schedule's last learning rate, as a fraction of the first.
LR_FLOOR = 0.02


def cosine_lr_factor(frac: float) -> float:
    """The cosine schedule's learning rate at `frac` (0 to 1) of a run, as a fraction of the first."""
    frac = min(max(frac, 0.0), 1.0)
    return LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * frac))


#: Settings a resumed run must keep: they define the objective, the data order or the model.
FIXED_ON_RESUME = ("role", "preset", "dataset", "data_dir", "kd", "tau", "lambda_e", "lambda_b", "w_l2", "w_kd",
                   "w_boundary", "batch_size", "seed", "augment", "init_from_teacher", "init_from", "prediction_type",
                   "focus_timesteps", "w_seg", "w_feat", "w_sampler_kd")


def read_state_config(state_dir: str | Path) -> dict | None:
    """The training settings recorded in ``<state_dir>/state.json`` (None if there is no state)."""
    js = Path(state_dir) / "state.json"
    if not js.exists():
        return None
    meta = _read_state_json(js)
    return dict(meta["config"])


def _read_state_json(js: Path) -> dict:
    from edgeseg.checkpoint import check_regular_file

    check_regular_file(js, "resume state", EdgesegError)
    try:
        meta = json.loads(js.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        for k, t, what in (("step", int, "an integer"), ("epoch", int, "an integer"), ("config", dict, "an object"),
                           ("param_groups", list, "a list"), ("plateau", dict, "an object"), ("history", list, "a list")):
            if not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool):
                raise ValueError(f"{k!r} is missing or not {what}")
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgesegError(f"{js}: corrupt resume state ({' '.join(str(e).split())}); the run cannot continue "
                           "from it") from None
    return meta


def paper_recipe(role: str, preset_name: str, dataset: str, data_dir: str | None = None) -> TrainConfig:
    """The paper's recipe (Sec. IV-A): batch 16, 2000 epochs, EMA 0.9999 after 500 steps."""
    if role == "teacher":
        return TrainConfig(role="teacher", preset=preset_name, dataset=dataset, data_dir=data_dir,
                           lr=1e-4, betas=(0.7, 0.99), plateau_patience=5)
    return TrainConfig(role="student", preset=preset_name, dataset=dataset, data_dir=data_dir,
                       lr=2e-4, plateau_patience=10)


def tiny_recipe(role: str) -> TrainConfig:
    """The CPU demo recipe for tiny presets on the synthetic set (README, "The main job")."""
    if role == "teacher":
        return TrainConfig(role="teacher", preset="tiny-teacher", lr=1e-3, epochs=12, batch_size=16,
                           plateau_patience=2, ema_beta=0.995, ema_start=200, num_workers=1)
    # init_from_teacher: the 15-minute CPU budget of the demo; the paper trains students from scratch.
    # focus_timesteps + w_seg: chosen by the real-lesion ablation (bench/README.md, "On real lesions")
    return TrainConfig(role="student", preset="tiny-student", lr=1e-3, epochs=5, batch_size=16,
                       plateau_patience=2, ema_beta=0.995, ema_start=100, num_workers=1,
                       init_from_teacher=True, focus_timesteps=0.5, w_seg=0.5)


# ----------------------------------------------------------------------------------------
# loss dispatch and EMA
# ----------------------------------------------------------------------------------------
def distill_loss(pred_s, pred_t, target, d, t, T, cfg: TrainConfig):
    """The student objective; EFKD goes through the fused kernel dispatch (Triton on CUDA)."""
    if cfg.kd == "efkd":
        from edgeseg.kernels import fused_distill_loss

        total, terms = fused_distill_loss(
            pred_s, pred_t, target, d, t, T, tau=cfg.tau, lambda_e=cfg.lambda_e, lambda_b=cfg.lambda_b,
            weights=(cfg.w_l2, cfg.w_kd, cfg.w_boundary), backend=cfg.kernel_backend,
        )
        return total, {"l2": terms["l2"], "kd": terms["efkd"], "boundary": terms["boundary"]}
    return student_objective(pred_s, pred_t, target, d, t, T, kd=cfg.kd, tau=cfg.tau, lambda_e=cfg.lambda_e,
                             lambda_b=cfg.lambda_b, weights=(cfg.w_l2, cfg.w_kd, cfg.w_boundary))


class EMA:
    """Exponential moving average of weights; copies the online weights until `start` steps."""

    def __init__(self, model: nn.Module, beta: float, start: int):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.beta, self.start = beta, start

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        dst, src = [], []
        for d, s in zip(self.model.state_dict().values(), model.state_dict().values()):
            if d.is_floating_point():
                dst.append(d)
                src.append(s.detach())
            else:  # an integer buffer (BatchNorm's batch count) is copied, never averaged
                d.copy_(s)
        if step <= self.start:
            torch._foreach_copy_(dst, src)
        else:
            torch._foreach_lerp_(dst, src, 1.0 - self.beta)


@torch.no_grad()
def init_from_teacher(student: DermoSegDiff, teacher: DermoSegDiff) -> int:
    """Copy the teacher's weights into the student wherever a stage has the same shape.

    A student is the teacher's depth cut, so its first stages (and the decoder stages that mirror
    them, plus the input/output layers) exist in the teacher. Decoder stage j of the student is
    decoder stage j + (teacher depth - student depth) of the teacher. Returns tensors copied.
    """
    shift = len(teacher.downs) - len(student.downs)
    t_state = teacher.state_dict()
    # a mobile student's plain convs start from the kernels the teacher's WSConv2d applies
    standardized = {f"{n}.weight": m.standardized_weight() for n, m in teacher.named_modules()
                    if isinstance(m, WSConv2d)}
    plain = {f"{n}.weight" for n, m in student.named_modules() if type(m) is nn.Conv2d}
    copied = 0
    for name, tensor in student.state_dict().items():
        src = name
        if name.startswith("ups."):
            j, rest = name[4:].split(".", 1)
            src = f"ups.{int(j) + shift}.{rest}"
        value = standardized[src] if name in plain and src in standardized else t_state.get(src)
        if value is not None and value.shape == tensor.shape:
            tensor.copy_(value)
            copied += 1
    return copied


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast pays on this device: CUDA, or a CPU with native bf16 (AVX-512 BF16 or AMX),
    where oneDNN runs bf16 convolutions and matmuls natively instead of emulating them."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _init_weights(path: str, p: Preset) -> dict:
    """The weights of checkpoint `path` for a network of preset `p`: the same architecture, except
    that the input size may differ (a 64-px model starts a 128-px one: its tensors have the same shapes)."""
    src = load_model(path)
    a, b = src.preset.architecture(), p.architecture()
    a.pop("image_size"), b.pop("image_size")
    if a != b:
        diff = sorted(k for k in a if a[k] != b[k])
        raise EdgesegError(f"init_from {path}: preset {src.preset.name!r} differs from {p.name!r} in {', '.join(diff)} "
                           "(fine-tuning needs the same network, at any input size)")
    return src.state_dict()


def _taps(net: DermoSegDiff | None, on: bool):
    """`stage_outputs(net)` when feature distillation is on, else an empty dict that stays empty."""
    return stage_outputs(net) if on else contextlib.nullcontext({})


# ----------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> torch.device:
    """Join the torchrun process group if launched by torchrun; pick the device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Trainer:
    """Trains `cfg.preset` (against `teacher` for students) and writes into `out_dir`.

    Files: `<out_dir>/<role>.safetensors|json` (EMA weights, written at the end),
    `<out_dir>/state/<role>/` (resumable state, rewritten atomically each epoch / save_every_steps),
    `<out_dir>/<role>-log.jsonl` (one JSON line per epoch) and `<out_dir>/<role>-curves.png`.
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, teacher: DermoSegDiff | None = None,
                 train_ds=None, val_ds=None, device: torch.device | None = None, quiet: bool = False):
        self.cfg, self.out_dir, self.quiet = cfg, Path(out_dir), quiet
        self.device = device or init_distributed()
        self.rank, self.world = _dist_info()
        if cfg.batch_size % self.world:
            raise EdgesegError(f"batch size {cfg.batch_size} is not divisible by {self.world} processes")
        self.p = preset(cfg.preset)
        if cfg.prediction_type is not None:
            self.p = replace(self.p, prediction_type=cfg.prediction_type)
        if cfg.role == "student" and teacher is None and cfg.kd != "none":
            raise EdgesegError("a student needs a teacher for KD (or use --kd none)")
        if teacher is None and cfg.w_sampler_kd > 0:
            raise EdgesegError("sampler distillation (w_sampler_kd > 0) needs a teacher")
        torch.manual_seed(cfg.seed)  # weight init
        self.model = build(self.p).to(self.device)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False) if teacher is not None else None
        if cfg.init_from is not None:
            self.model.load_state_dict(_init_weights(cfg.init_from, self.p))
        self.bf16 = cfg.bf16 and bf16_supported(self.device)
        if cfg.init_from_teacher and self.teacher is not None:
            init_from_teacher(self.model, self.teacher)
        self.ema = EMA(self.model, cfg.ema_beta, cfg.ema_start)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
        self.schedule = self.model.noise_schedule
        self.focus_t = self._sampler_timesteps() if cfg.focus_timesteps > 0 else None
        # the teacher's sampler at its defaults (edgeseg.defaults): the target of sampler distillation
        self.teacher_segmenter = None
        if cfg.w_sampler_kd > 0:
            from edgeseg.segmenter import Segmenter

            self.teacher_segmenter = Segmenter.from_model(self.teacher)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)  # timesteps + noise, checkpointed
        self.step, self.epoch = 0, 0
        self.train_seconds = 0.0  # wall time spent in fit(), over resumes (max_seconds)
        self._fit_started: float | None = None  # time.time() when the running fit() began
        self.epoch_sums: dict[str, float] = {}
        self.history: list[dict] = []
        self.resumes: list[dict] = []  # settings changed at each --resume: {"step", "epoch", "changed"}
        self.ddp = None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.train_ds, self.val_ds = train_ds, val_ds
        if self.train_ds is None:
            from edgeseg.data import load_dataset

            kw = dict(data_dir=cfg.data_dir, size=self.p.image_size, seed=cfg.seed)
            self.train_ds = load_dataset(cfg.dataset, "train", augment=cfg.augment, **kw)
            self.val_ds = load_dataset(cfg.dataset, "val", augment=False, **kw)

    # ---- state ------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.out_dir / "state" / self.cfg.role

    def _non_finite(self) -> list[str]:
        """Names of model / EMA tensors holding NaN or inf (empty when all are finite)."""
        out = []
        for prefix, m in (("model", self.model), ("ema", self.ema.model)):
            out += [f"{prefix}.{k}" for k, v in m.state_dict().items()
                    if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        return out

    def save_state(self) -> None:
        """Write the resumable state atomically: tensors to safetensors, the rest to JSON.

        Non-finite weights are never written: the last good state stays on disk."""
        if self.rank != 0:
            return
        bad = self._non_finite()
        if bad:
            raise TrainingDiverged(
                f"{len(bad)} weight tensors became NaN or inf by step {self.step} (e.g. {bad[0]}); not saved. "
                f"The last good checkpoint is kept in {self.state_dir}"
            )
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.model.state_dict().items()})
        opt = self.opt.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.gen"] = self.gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        save_tensors(self.state_dir / "state.safetensors", tensors, metadata={"step": str(self.step)})
        # JSON last; both record the step, so a crash between the two writes is detected on
        # resume instead of silently mixing two states.
        atomic_write_json(self.state_dir / "state.json", {
            "step": self.step, "epoch": self.epoch, "config": self.cfg.to_dict(),
            "param_groups": opt["param_groups"], "plateau": self.plateau.state_dict(),
            "history": self.history, "epoch_sums": self.epoch_sums, "resumes": self.resumes,
            "train_seconds": round(self._seconds_now(), 3),
        })

    def load_state(self) -> None:
        """Continue from ``state_dir``. Settings in FIXED_ON_RESUME must equal the run's (else
        SettingsError); any other changed setting (lr, epochs, max_steps, ...) is applied and
        recorded in the state, the final JSON and ``<role>-log.jsonl``. A corrupt state is one
        EdgesegError naming the file."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        js, st = self.state_dir / "state.json", self.state_dir / "state.safetensors"
        if not js.exists() or not st.exists():
            raise EdgesegError(f"{self.state_dir}: no resumable state to continue from")
        meta = _read_state_json(js)
        changed = self._resume_changes(meta["config"])
        try:
            with safe_open(str(st), "pt") as f:
                tensor_step = int((f.metadata() or {}).get("step", -1))
            tensors = load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise EdgesegError(f"{st}: corrupt resume state ({' '.join(str(e).split())})") from None
        if tensor_step != meta["step"]:
            raise EdgesegError(
                f"{self.state_dir}: state.json is at step {meta['step']} but state.safetensors at step "
                f"{tensor_step} (interrupted while saving?); cannot resume exactly"
            )
        try:
            self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            self.ema.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
            opt_state: dict[int, dict] = {}
            for k, v in tensors.items():
                if k.startswith("opt."):
                    _, i, name = k.split(".", 2)
                    opt_state.setdefault(int(i), {})[name] = v
            self.opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
            self.plateau.load_state_dict(meta["plateau"])
            self.gen.set_state(tensors["rng.gen"])
            torch.set_rng_state(tensors["rng.torch"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            msg = " ".join(str(e).split())[:200]
            raise EdgesegError(f"{self.state_dir}: resume state does not fit this run ({msg})") from None
        self.step, self.epoch, self.history = meta["step"], meta["epoch"], meta["history"]
        self.epoch_sums = meta.get("epoch_sums", {})
        self.resumes = list(meta.get("resumes", []))
        self.train_seconds = float(meta.get("train_seconds", 0.0))
        # the settings that may change take effect now (the optimizer and scheduler state above
        # carry the run's own values)
        if "lr" in changed:
            for g in self.opt.param_groups:
                g["lr"] = self.cfg.lr
            self.plateau._last_lr = [self.cfg.lr for _ in self.opt.param_groups]
        for g in self.opt.param_groups:
            g["betas"] = tuple(self.cfg.betas)
        self.plateau.factor, self.plateau.patience = self.cfg.plateau_factor, self.cfg.plateau_patience
        if changed:
            rec = {"event": "resume", "step": self.step, "epoch": self.epoch, "changed": changed}
            self.resumes.append(rec)
            self._append_log(rec)

    def _resume_changes(self, saved: dict) -> dict[str, list]:
        """{setting: [run's value, new value]} for the settings that differ from the run's."""
        defaults = TrainConfig().to_dict()
        now = json.loads(json.dumps(self.cfg.to_dict()))
        was = json.loads(json.dumps({k: saved.get(k, defaults.get(k)) for k in now}))
        diff = {k: [was[k], now[k]] for k in now if was[k] != now[k]}
        fixed = [k for k in FIXED_ON_RESUME if k in diff]
        if fixed:
            what = "; ".join(f"{k} {diff[k][0]!r} -> {diff[k][1]!r}" for k in fixed)
            raise SettingsError(f"{self.state_dir}: cannot resume with changed settings ({what}); these must stay "
                                "as the run started, start a new run (--run-name) to change them")
        return diff

    # ---- one step ---------------------------------------------------------------------
    def _sampler_timesteps(self) -> torch.Tensor:
        """The timesteps the shipped sampler visits (DDIM, K from the defaults table)."""
        from edgeseg.defaults import sampler_defaults
        from edgeseg.diffusion import DDIMScheduler

        sched = DDIMScheduler(self.schedule, prediction_type=self.p.prediction_type)
        sched.set_timesteps(sampler_defaults(self.p.prediction_type)[0])
        return sched.timesteps.clone()

    def _draw(self, global_b: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and noise for the global batch; this rank's rows (interleaved like the sampler)."""
        t = torch.randint(0, self.schedule.T, (global_b,), generator=self.gen)
        if self.focus_t is not None:
            focus = torch.rand(global_b, generator=self.gen) < self.cfg.focus_timesteps
            pick = self.focus_t[torch.randint(0, len(self.focus_t), (global_b,), generator=self.gen)]
            t = torch.where(focus, pick, t)
        noise = torch.randn((global_b, *shape), generator=self.gen)
        return t[self.rank :: self.world], noise[self.rank :: self.world]

    def loss_on(self, model, image, mask, d, t, noise):
        x_t = self.schedule.q_sample(mask, t, noise)
        target = self.schedule.training_target(mask, noise, t, self.p.prediction_type)
        feats = self.cfg.w_feat > 0 and self.teacher is not None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16), \
                _taps(self.model, feats) as f_s, _taps(self.teacher, feats) as f_t:
            pred = model(x_t, image, t)
            if self.cfg.role == "teacher":
                return teacher_objective(pred, target, d, t, self.schedule.T, self.cfg.w_l2, self.cfg.w_boundary)
            kd = self.teacher is not None and self.cfg.kd != "none"
            if kd or feats:
                with torch.no_grad():
                    out_t = self.teacher(x_t, image, t)  # also fills f_t
            # no KD: a teacher given anyway initialises the student (and teaches features) only
            pred_t = self._in_student_terms(out_t, x_t, t) if kd else torch.zeros_like(pred)
        total, terms = distill_loss(pred.float(), pred_t.float(), target, d, t, self.schedule.T, self.cfg)
        if feats:
            terms["feat"] = feature_kd_loss(f_s, f_t)
            total = total + self.cfg.w_feat * terms["feat"]
        if self.cfg.w_seg > 0 or self.cfg.w_sampler_kd > 0:
            x0, _ = self.schedule.to_x0_eps(pred.float(), x_t, t, self.p.prediction_type, clip=False)
        if self.cfg.w_seg > 0:
            terms["seg"] = x0_segmentation_loss(x0, mask)
            total = total + self.cfg.w_seg * terms["seg"]
        if self.cfg.w_sampler_kd > 0:
            terms["sampler_kd"] = self._sampler_kd_loss(x0, image, d, t)
            total = total + self.cfg.w_sampler_kd * terms["sampler_kd"]
        return total, terms

    def _sampler_kd_loss(self, x0: torch.Tensor, image: torch.Tensor, d: torch.Tensor, t: torch.Tensor):
        """Sampler distillation: where the phone's sampler starts (the rows at its first timestep, x_t
        all but pure noise), the student's x0 against the teacher's final answer, the mean of its
        K-step ensemble, weighted edge/body as EFKD (Eq. 3-7). Zero when no row is at that timestep."""
        rows = t == self.focus_t[0]
        if not bool(rows.any()):
            return x0.new_zeros(())
        with torch.no_grad():
            target, _ = self.teacher_segmenter.predict(image[rows], generator=self._teacher_noise())
        c = self.cfg
        return efkd_loss(x0[rows], target.to(x0.device), d[rows], t[rows], self.schedule.T, c.tau, c.lambda_e,
                         c.lambda_b)

    def _teacher_noise(self) -> torch.Generator:
        """The teacher sampler's generator, a function of (seed, step, rank): the shared timestep and
        noise stream stays the same on every rank, and a resumed run draws the same teacher noise."""
        return torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + self.step) * 64 + self.rank)

    @torch.no_grad()
    def _in_student_terms(self, pred_t: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The teacher's output in the student's parameterisation: read as (x0, eps) and re-expressed
        (x0 clipped to [-1, 1], as the sampler does) when the two prediction types differ."""
        t_type = self.teacher.preset.prediction_type
        if t_type == self.p.prediction_type:
            return pred_t
        x0_t, eps_t = self.schedule.to_x0_eps(pred_t.float(), x_t, t, t_type)
        return self.schedule.training_target(x0_t, eps_t, t, self.p.prediction_type)

    def train_step(self, batch) -> dict[str, float]:
        image, mask, d = (x.to(self.device, non_blocking=True) for x in batch)
        t, noise = self._draw(self.cfg.batch_size, tuple(mask.shape[1:]))
        t, noise = t.to(self.device), noise.to(self.device)
        self.model.train()
        total, terms = self.loss_on(self.ddp if self.ddp is not None else self.model, image, mask, d, t, noise)
        if not torch.isfinite(total):
            raise TrainingDiverged(
                f"loss became {total.item()} at step {self.step + 1} (epoch {self.epoch + 1}); stopped. "
                f"The last good checkpoint is kept in {self.state_dir}"
            )
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.lr_schedule == "cosine":
            for g in self.opt.param_groups:
                g["lr"] = self.cfg.lr * cosine_lr_factor(self.run_fraction())
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        if not self._params_finite():
            # the loss was finite but the update was not: nothing of this step may reach a checkpoint
            raise TrainingDiverged(
                f"the update of step {self.step + 1} (epoch {self.epoch + 1}) made the weights NaN or inf "
                f"(learning rate {self.lr:g}); stopped. The last good checkpoint is kept in {self.state_dir}"
            )
        self.step += 1
        self.ema.update(self.model, self.step)
        return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}

    @torch.no_grad()
    def _params_finite(self) -> bool:
        params = [p.detach() for p in self.model.parameters()]
        norms = torch._foreach_norm(params)
        return bool(torch.isfinite(torch.stack(norms)).all())

    @torch.no_grad()
    def validate(self) -> float:
        """Mean objective on the validation split with fixed timesteps/noise (comparable across epochs)."""
        if self.val_ds is None or len(self.val_ds) == 0:
            return float("nan")
        self.model.eval()
        gen = torch.Generator().manual_seed(12345)
        sampler = DistributedSampler(self.val_ds, self.world, self.rank, shuffle=False) if self.world > 1 else None
        loader = DataLoader(self.val_ds, batch_size=max(1, self.cfg.batch_size // self.world), sampler=sampler)
        tot, n = torch.zeros((), dtype=torch.float64), 0
        for i, (image, mask, d) in enumerate(loader):
            if self.cfg.val_max_batches is not None and i >= self.cfg.val_max_batches:
                break
            # draws for the global batch, this rank's interleaved rows: DDP == one process
            b = mask.shape[0]
            t = torch.randint(0, self.schedule.T, (self.cfg.batch_size,), generator=gen)
            noise = torch.randn((self.cfg.batch_size, *mask.shape[1:]), generator=gen)
            t, noise = t[self.rank :: self.world][:b], noise[self.rank :: self.world][:b]
            dev = [x.to(self.device) for x in (image, mask, d, t, noise)]
            loss, _ = self.loss_on(self.model, *dev)
            tot += float(loss) * b
            n += b
        if self.world > 1:
            buf = torch.tensor([float(tot), float(n)], device=self.device, dtype=torch.float64)
            dist.all_reduce(buf)
            tot, n = buf[0].cpu(), int(buf[1])
        return float(tot) / max(n, 1)

    # ---- the loop ---------------------------------------------------------------------
    def _loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """This rank's batches of `epoch`; `skip_batches` resumes in the middle of an epoch."""
        from edgeseg.data import worker_init_fn

        sampler = DistributedSampler(self.train_ds, self.world, self.rank, shuffle=True,
                                     seed=self.cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        local_b = self.cfg.batch_size // self.world
        indices = list(sampler)[skip_batches * local_b:]
        if hasattr(self.train_ds, "set_epoch"):
            self.train_ds.set_epoch(epoch)
        return DataLoader(
            self.train_ds, batch_size=local_b, sampler=indices, drop_last=True,
            num_workers=self.cfg.num_workers, worker_init_fn=worker_init_fn,
            generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch),
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )

    def _steps_per_epoch(self) -> int:
        return len(self.train_ds) // self.cfg.batch_size

    def total_steps(self) -> int:
        per_epoch = self._steps_per_epoch()
        if per_epoch == 0:
            raise EdgesegError(
                f"the {self.cfg.dataset} train split has {len(self.train_ds)} images, fewer than one batch "
                f"of {self.cfg.batch_size}"
            )
        total = per_epoch * self.cfg.epochs
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def fit(self, on_epoch_end: Callable[["Trainer", dict], None] | None = None,
            stop_after_steps: int | None = None) -> nn.Module:
        """Train to the end (or `stop_after_steps` more steps, for tests); returns the EMA model."""
        total = self.total_steps()
        stop = total if stop_after_steps is None else min(total, self.step + stop_after_steps)
        self._fit_started = time.time()
        with _FitProgress(self, total, show=self.rank == 0 and not self.quiet) as bar:
            while self.step < stop and not self._time_up() and self._fit_epoch(bar, stop, on_epoch_end):
                pass
            self.save_state()
        self.train_seconds, self._fit_started = self._seconds_now(), None
        if self.rank == 0:
            self.save_final()
        return self.ema.model

    def _seconds_now(self) -> float:
        """Training wall time so far: earlier fit() calls and resumes plus the running one."""
        started = self._fit_started
        return self.train_seconds + (time.time() - started if started else 0.0)

    def run_fraction(self) -> float:
        """How far the run is: steps done over total steps, or training seconds over max_seconds,
        whichever limit is nearer."""
        frac = self.step / max(self.total_steps(), 1)
        if self.cfg.max_seconds is not None:
            frac = max(frac, self._seconds_now() / self.cfg.max_seconds)
        return min(frac, 1.0)

    def _time_up(self) -> bool:
        return self.cfg.max_seconds is not None and self._seconds_now() >= self.cfg.max_seconds

    def _fit_epoch(self, bar: "_FitProgress", stop: int, on_epoch_end) -> bool:
        """Train the rest of the current epoch (after a mid-epoch resume, only the rest).

        Returns True when the epoch ran to its end (and was closed by `_end_epoch`), False when
        `stop` was reached inside it."""
        t0 = time.time()
        skip = self.step - self.epoch * self._steps_per_epoch()  # > 0 after resuming mid-epoch
        if skip == 0:
            self.epoch_sums = {}
        for batch in self._loader(self.epoch, skip):
            if self.step >= stop or self._time_up():
                return False
            self._fit_step(batch, bar, t0)
        self._end_epoch(bar, t0, on_epoch_end)
        return True

    def _fit_step(self, batch, bar: "_FitProgress", t0: float) -> None:
        """One optimiser step: add its losses to the epoch's running sums, report, checkpoint."""
        try:
            logs = self.train_step(batch)
        except TrainingDiverged:
            bar.stop()
            raise
        run = self.epoch_sums  # running loss sums of this epoch (checkpointed)
        for k, v in logs.items():
            run[k] = run.get(k, 0.0) + v
        nb = self.step - self.epoch * self._steps_per_epoch()
        bar.on_step(self, " ".join(f"{k} {v / nb:.4f}" for k, v in run.items() if k in ("loss", "kd")), t0)
        if self.cfg.save_every_steps and self.step % self.cfg.save_every_steps == 0:
            self.save_state()

    def _end_epoch(self, bar: "_FitProgress", t0: float, on_epoch_end) -> None:
        """A full epoch: validate, step the plateau scheduler, log, checkpoint."""
        self.epoch += 1
        per_epoch = self._steps_per_epoch()
        rec = {"epoch": self.epoch, "step": self.step, "lr": self.lr,
               "seconds": round(time.time() - t0, 2),
               **{f"train_{k}": v / per_epoch for k, v in self.epoch_sums.items()}}
        if self.epoch % self.cfg.val_every == 0:
            rec["val_loss"] = self.validate()
            if math.isfinite(rec["val_loss"]) and self.cfg.lr_schedule == "plateau":
                self.plateau.step(rec["val_loss"])
        if on_epoch_end is not None:
            on_epoch_end(self, rec)
        bar.on_epoch(self, rec)
        self.history.append(rec)
        self._write_log(rec)
        self.save_state()

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def _append_log(self, rec: dict) -> None:
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"{self.cfg.role}-log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _write_log(self, rec: dict) -> None:
        if self.rank != 0:
            return
        self._append_log(rec)
        try:
            from edgeseg.viz import plot_curves

            plot_curves(self.history, self.out_dir / f"{self.cfg.role}-curves.png", title=f"{self.cfg.role} {self.p.name}")
        except Exception as e:  # a plot must never stop training
            if not self.quiet:
                print(f"warning: could not draw curves: {e}")

    def save_final(self) -> Path:
        extra = {"train_config": self.cfg.to_dict(), "steps": self.step, "epochs": self.epoch,
                 "train_seconds": round(self.train_seconds, 1), "bf16_autocast": self.bf16}
        if self.resumes:
            extra["resumes"] = self.resumes
        return save_model(self.ema.model, self.out_dir / f"{self.cfg.role}.safetensors", extra=extra)


class _FitProgress:
    """What `Trainer.fit` shows: a live bar on a terminal, a line every 50 steps in logs and
    pipes, a line per epoch; nothing unless `show`."""

    def __init__(self, trainer: Trainer, total: int, show: bool):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.total, self.show, self.start = total, show, trainer.step
        self.progress = Progress(
            TextColumn(f"[bold]{trainer.cfg.role} {trainer.p.name}[/]"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not show, transient=False,
        )

    def __enter__(self) -> "_FitProgress":
        self.progress.__enter__()
        self.task = self.progress.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def stop(self) -> None:
        self.progress.stop()

    def on_step(self, tr: Trainer, info: str, t0: float) -> None:
        self.progress.update(self.task, completed=tr.step, info=f"ep {tr.epoch + 1} {info} lr {tr.lr:.1e}")
        if self.show and not self.progress.console.is_terminal and tr.step % 50 == 0:
            # logs and pipes get a line now and then instead of a live bar
            self.progress.console.print(f"{tr.cfg.role} step {tr.step}/{self.total} {info} "
                                        f"({time.time() - t0:.0f} s into epoch {tr.epoch + 1})")

    def on_epoch(self, tr: Trainer, rec: dict) -> None:
        if self.show:
            self.progress.console.print(
                f"{tr.cfg.role} epoch {tr.epoch} step {tr.step}: "
                + " ".join(f"{k} {v:.4g}" for k, v in rec.items()
                           if k not in ("epoch", "step") and isinstance(v, float))
            )
