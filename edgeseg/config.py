"""Training settings: :class:`TrainConfig`, its validation (one line per bad setting), the rule
for what a resumed run may change, and the recipes (the paper's and the tiny CPU one)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from edgeseg.errors import EdgesegError, SettingsError

__all__ = ["TrainConfig", "validate_settings", "FIXED_ON_RESUME", "changed_settings", "check_resume",
           "read_state_config", "read_state_json", "REMOVED_SETTINGS", "without_removed_settings", "paper_recipe",
           "tiny_recipe", "recipe", "same_folder"]


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
    w_seg: float = 0.0  # weight of Dice + BCE on the predicted x0 (losses.x0_segmentation_loss)
    # students: weight of feature distillation on every stage the teacher shares (losses.feature_kd_loss),
    # for a student whose blocks differ from the teacher's (mobile blocks)
    w_feat: float = 0.0

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - set(REMOVED_SETTINGS))
        if unknown:
            raise SettingsError(f"unknown training settings {unknown}; known: {sorted(names)}")
        return cls(**without_removed_settings(d))


#: Settings of earlier versions, read at their default (saved run states and checkpoints carry
#: them) and refused otherwise: setting -> (default, what it was, the commit whose code runs it).
REMOVED_SETTINGS = {
    "w_sampler_kd": (0.0, "sampler distillation", "3a06f44"),
}


def without_removed_settings(d: dict) -> dict:
    """`d` without the settings of :data:`REMOVED_SETTINGS` at their default; SettingsError for
    another value, naming the commit that can run it."""
    out = dict(d)
    for name, (default, what, commit) in REMOVED_SETTINGS.items():
        if name in out and out.pop(name) != default:
            raise SettingsError(f"training setting {name} = {d[name]!r} ({what}) is no longer supported; "
                                f"edgeseg at commit {commit} runs it")
    return out


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


#: Settings a resumed run must keep: they define the objective, the data order or the model.
FIXED_ON_RESUME = ("role", "preset", "dataset", "data_dir", "kd", "tau", "lambda_e", "lambda_b", "w_l2", "w_kd",
                   "w_boundary", "batch_size", "seed", "augment", "init_from_teacher", "init_from", "prediction_type",
                   "focus_timesteps", "w_seg", "w_feat")


def read_state_config(state_dir: str | Path) -> dict | None:
    """The training settings recorded in ``<state_dir>/state.json`` (None if there is no state)."""
    js = Path(state_dir) / "state.json"
    if not js.exists():
        return None
    meta = read_state_json(js)
    return without_removed_settings(meta["config"])


def read_state_json(js: Path) -> dict:
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


def recipe(role: str, preset_name: str, dataset: str, data_dir: str | None) -> TrainConfig:
    """The recipe the main job trains `preset_name` with: tiny presets the CPU one, others the paper's."""
    if preset_name.startswith("tiny-"):
        cfg = tiny_recipe(role)
        cfg.preset, cfg.dataset, cfg.data_dir = preset_name, dataset, data_dir
        return cfg
    return paper_recipe(role, preset_name, dataset, data_dir)


def same_folder(a, b) -> bool:
    """Whether two spellings name one folder (``data`` and ``./data/``)."""
    return a is not None and b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))  # tuples as lists, paths as text: what a state file holds


def changed_settings(saved: dict, now: dict) -> dict[str, list]:
    """{setting: [run's value, value now]} for each setting in `now` that differs from the run's
    `saved` one (a setting the run did not record counts as its default)."""
    defaults = TrainConfig().to_dict()
    was = _plain({k: saved.get(k, defaults.get(k)) for k in now})
    cur = _plain(now)
    return {k: [was[k], cur[k]] for k in cur
            if was[k] != cur[k] and not (k == "data_dir" and same_folder(was[k], cur[k]))}


def check_resume(saved: dict, now: dict) -> dict[str, list]:
    """The one resume rule (the CLI before any work, the trainer on loading its state): settings in
    :data:`FIXED_ON_RESUME` must equal the run's, else SettingsError naming each; returns every
    changed setting (the others: lr, epochs, max_steps, ... are applied and recorded)."""
    diff = changed_settings(without_removed_settings(saved), now)
    fixed = [k for k in FIXED_ON_RESUME if k in diff]
    if fixed:
        what = "; ".join(f"{k} {diff[k][0]!r} -> {diff[k][1]!r}" for k in fixed)
        raise SettingsError(f"cannot resume with changed settings ({what}): these cannot change once a run has "
                            "started; start a new run with another --run-name to change them")
    return diff
