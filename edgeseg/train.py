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
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from edgeseg.checkpoint import atomic_write_json, save_model, save_tensors
from edgeseg.config import (FIXED_ON_RESUME, TrainConfig, check_resume, paper_recipe, read_state_config,
                            read_state_json, tiny_recipe, validate_settings)
from edgeseg.devices import bf16_supported, dist_info, init_distributed
from edgeseg.ema import EMA
from edgeseg.errors import EdgesegError, SettingsError
from edgeseg.losses import feature_kd_loss, student_objective, teacher_objective, x0_segmentation_loss
from edgeseg.models import DermoSegDiff, build, preset, stage_outputs
from edgeseg.warmstart import init_from_teacher, init_weights

# TrainConfig, the recipes and the resume rule live in edgeseg.config, EMA in edgeseg.ema, the device and
# DDP set-up in edgeseg.devices, warm starts in edgeseg.warmstart; they stay importable from here.
__all__ = ["TrainConfig", "Trainer", "run_state_dir", "TrainingDiverged", "distill_loss", "EMA", "paper_recipe", "tiny_recipe",
           "validate_settings", "read_state_config", "FIXED_ON_RESUME", "LR_FLOOR", "cosine_lr_factor",
           "init_from_teacher", "bf16_supported", "init_distributed"]


class TrainingDiverged(EdgesegError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


#: The cosine schedule's last learning rate, as a fraction of the first.
LR_FLOOR = 0.02


def cosine_lr_factor(frac: float) -> float:
    """The cosine schedule's learning rate at `frac` (0 to 1) of a run, as a fraction of the first."""
    frac = min(max(frac, 0.0), 1.0)
    return LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * frac))


# ----------------------------------------------------------------------------------------
# loss dispatch
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


def _taps(net: DermoSegDiff | None, on: bool):
    """`stage_outputs(net)` when feature distillation is on, else an empty dict that stays empty."""
    return stage_outputs(net) if on else contextlib.nullcontext({})


# ----------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------

def run_state_dir(run: Path, role: str) -> Path:
    """Where a run folder keeps `role`'s resume state (state.json + state.safetensors)."""
    return Path(run) / "state" / role


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
        self.rank, self.world = dist_info()
        if cfg.batch_size % self.world:
            raise EdgesegError(f"batch size {cfg.batch_size} is not divisible by {self.world} processes")
        self.p = preset(cfg.preset)
        if cfg.prediction_type is not None:
            self.p = replace(self.p, prediction_type=cfg.prediction_type)
        if cfg.role == "student" and teacher is None and cfg.kd != "none":
            raise EdgesegError("a student needs a teacher for KD (or use --kd none)")
        torch.manual_seed(cfg.seed)  # weight init
        self.model = build(self.p).to(self.device)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False) if teacher is not None else None
        if cfg.init_from is not None:
            self.model.load_state_dict(init_weights(cfg.init_from, self.p))
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
        return run_state_dir(self.out_dir, self.cfg.role)

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
        meta = read_state_json(js)
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
        """{setting: [run's value, new value]} for the settings that differ from the run's (edgeseg.config.check_resume)."""
        try:
            return check_resume(saved, self.cfg.to_dict())
        except SettingsError as e:
            raise SettingsError(f"{self.state_dir}: {e}") from None

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
            if self.cfg.role != "teacher":
                kd = self.teacher is not None and self.cfg.kd != "none"
                if kd or feats:
                    with torch.no_grad():
                        out_t = self.teacher(x_t, image, t)  # also fills f_t
                # no KD: a teacher given anyway initialises the student (and teaches features) only
                pred_t = self._in_student_terms(out_t, x_t, t) if kd else torch.zeros_like(pred)
        if self.cfg.role == "teacher":
            total, terms = teacher_objective(pred.float(), target, d, t, self.schedule.T, self.cfg.w_l2,
                                             self.cfg.w_boundary)
        else:
            total, terms = distill_loss(pred.float(), pred_t.float(), target, d, t, self.schedule.T, self.cfg)
        if feats:
            terms["feat"] = feature_kd_loss(f_s, f_t)
            total = total + self.cfg.w_feat * terms["feat"]
        if self.cfg.w_seg > 0:
            x0, _ = self.schedule.to_x0_eps(pred.float(), x_t, t, self.p.prediction_type, clip=False)
            terms["seg"] = x0_segmentation_loss(x0, mask)
            total = total + self.cfg.w_seg * terms["seg"]
        return total, terms

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
        # a run takes at least one step, however slow the machine: a budget spent loading data
        # must not leave an untrained model that looks trained
        return self.cfg.max_seconds is not None and self.step > 0 and self._seconds_now() >= self.cfg.max_seconds

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
