"""Training engine: bit-exact resume, NaN stop, DDP equivalence, EMA, teacher/student checks.

Everything runs on CPU with micro presets (32 px, ~0.1M parameters) on small subsets of the
synthetic set, so the whole file takes seconds once the 32 px synthetic cache is built.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import edgeseg.viz
from edgeseg.errors import EdgesegError
from edgeseg.models import build
from edgeseg.train import EMA, TrainConfig, Trainer, TrainingDiverged
from micro import MICRO_STUDENT, MICRO_TEACHER, ddp_config, make_trainer, micro_config, micro_teacher

CPU = torch.device("cpu")
_REAL_PLOT_CURVES = edgeseg.viz.plot_curves
TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("micro_env")
trainer = make_trainer


def cfg(**kw) -> TrainConfig:
    """EFKD, a state saved every 3 steps (mid-epoch: the resume tests stop between saves)."""
    return micro_config(**{"save_every_steps": 3, **kw})


# ----------------------------------------------------------------------------------------
# helpers to compare whole trainer states
# ----------------------------------------------------------------------------------------
def assert_sd_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max |diff| {(a[k] - b[k]).abs().max():.3g})"


def _norm(x):
    if isinstance(x, (list, tuple)):
        return [_norm(v) for v in x]
    if isinstance(x, dict):
        return {k: _norm(v) for k, v in x.items()}
    return x


def assert_trainers_equal(a: Trainer, b: Trainer, history: bool = True) -> None:
    assert (a.step, a.epoch) == (b.step, b.epoch)
    assert_sd_equal(a.model.state_dict(), b.model.state_dict(), "model")
    assert_sd_equal(a.ema.model.state_dict(), b.ema.model.state_dict(), "ema")
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert_sd_equal(sa["state"][i], sb["state"][i], f"optimizer state {i}")
    assert _norm(sa["param_groups"]) == _norm(sb["param_groups"])
    assert _norm(a.plateau.state_dict()) == _norm(b.plateau.state_dict())
    assert torch.equal(a.gen.get_state(), b.gen.get_state())
    if history:
        strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
        assert strip(a.history) == strip(b.history)


# ----------------------------------------------------------------------------------------
# 1. resume
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, data):
    """A: uninterrupted; B: stopped after 5 steps then resumed; C: 'killed' after the step-3 save."""
    tmp = tmp_path_factory.mktemp("resume")
    teacher = micro_teacher()
    c = cfg(epochs=2)  # 4 steps per epoch, 8 in all; saves at 3, 4 (epoch end), 6, 8

    a = trainer(c, tmp / "a", data, teacher)
    a.fit()

    b = trainer(c, tmp / "b", data, teacher)
    orig_save = b.save_state
    saved_steps = []

    def spy():
        orig_save()
        saved_steps.append(b.step)
        if b.step == 3 and not (tmp / "snap3").exists():  # a hard kill right after this save
            shutil.copytree(b.state_dir, tmp / "snap3")

    b.save_state = spy
    b.fit(stop_after_steps=5)
    assert b.step == 5
    b_resumed = trainer(c, tmp / "b", data, teacher)
    b_resumed.load_state()
    assert b_resumed.step == 5 and b_resumed.epoch == 1
    b_resumed.fit()

    shutil.copytree(tmp / "snap3", tmp / "c" / "state" / c.role)
    c_resumed = trainer(c, tmp / "c", data, teacher)
    c_resumed.load_state()
    assert c_resumed.step == 3 and c_resumed.epoch == 0
    c_resumed.fit()
    return dict(tmp=tmp, a=a, b=b_resumed, c=c_resumed, saved_steps=saved_steps)


def test_resume_after_stop_is_bit_exact(resume_runs):
    r = resume_runs
    assert r["saved_steps"] == [3, 4, 5], "save_every_steps=3, the epoch end and the stop"
    assert r["a"].step == r["b"].step == 8
    assert_trainers_equal(r["a"], r["b"], history=False)
    # the final EMA checkpoints on disk too
    from safetensors.torch import load_file

    fa = load_file(str(r["tmp"] / "a" / "student.safetensors"))
    fb = load_file(str(r["tmp"] / "b" / "student.safetensors"))
    assert_sd_equal(fa, fb, "student.safetensors")
    assert_sd_equal(fa, dict(r["a"].ema.model.state_dict()), "final file holds the EMA weights")


def test_resume_after_hard_kill_mid_epoch_is_bit_exact(resume_runs):
    r = resume_runs
    assert r["c"].step == 8
    assert_trainers_equal(r["a"], r["c"], history=False)


def test_resume_history_equal_except_train_averages(resume_runs):
    """Epoch boundaries, val losses and LRs of the resumed runs equal the uninterrupted run's."""
    a = resume_runs["a"].history
    for name in ("b", "c"):
        h = resume_runs[name].history
        assert [(r["epoch"], r["step"], r["lr"], r["val_loss"]) for r in h] == \
               [(r["epoch"], r["step"], r["lr"], r["val_loss"]) for r in a]


def test_resume_history_train_averages_equal(resume_runs):
    a = resume_runs["a"].history
    for name in ("b", "c"):
        h = resume_runs[name].history
        strip = lambda hh: [{k: v for k, v in r.items() if k != "seconds"} for r in hh]  # noqa: E731
        assert strip(h) == strip(a), name


def test_resume_detects_torn_state(resume_runs, tmp_path, data):
    """state.json from one save and state.safetensors from another: refused, not mixed."""
    tmp = resume_runs["tmp"]
    torn = tmp_path / "state" / "student"
    torn.mkdir(parents=True)
    shutil.copy(tmp / "b" / "state" / "student" / "state.json", torn / "state.json")  # step 8
    shutil.copy(tmp / "snap3" / "state.safetensors", torn / "state.safetensors")  # step 3
    t = trainer(cfg(epochs=2), tmp_path, data, micro_teacher())
    with pytest.raises(EdgesegError, match="cannot resume exactly"):
        t.load_state()
    empty = trainer(cfg(epochs=2), tmp_path / "nothing", data, micro_teacher())
    with pytest.raises(EdgesegError, match="no resumable state"):
        empty.load_state()


def test_distance_map_is_reproducible():
    import numpy as np

    from edgeseg.boundary import distance_map

    yy, xx = np.mgrid[:32, :32]
    m = (((yy - 15.3) ** 2 / 90 + (xx - 16.7) ** 2 / 50) < 1).astype(np.float32)
    ref, junk = distance_map(m), []
    for i in range(2000):
        junk.append(np.empty(1 + (i * 7) % 61, np.uint8))  # shift the heap, as a long run does
        junk.append(np.empty(4096 + 16 * (i % 5), np.uint8))
        out = distance_map(m)
        assert np.array_equal(out, ref), f"call {i + 2} differs by {float(np.abs(out - ref).max()):.3g}"


# ----------------------------------------------------------------------------------------
# 2. NaN / inf stop
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_loss_stops_and_keeps_last_good_state(tmp_path, data, bad, monkeypatch):
    c = cfg(kd="none", save_every_steps=2)
    t = trainer(c, tmp_path, data)
    k = 3  # the step whose loss goes bad; the last save was at step 2
    orig_forward = t.model.forward

    def forward(*args, **kw):
        out = orig_forward(*args, **kw)
        if t.model.training and t.step + 1 == k:
            out = out + float(bad)
        return out

    monkeypatch.setattr(t.model, "forward", forward)
    with pytest.raises(TrainingDiverged) as ei:
        t.fit()
    msg = str(ei.value)
    assert f"at step {k} " in msg and "epoch 1" in msg, msg
    assert ("nan" in msg) or ("inf" in msg), msg
    assert str(t.state_dir) in msg and "\n" not in msg
    assert isinstance(ei.value, EdgesegError)  # the CLI turns it into one line + exit 2
    assert not (tmp_path / "student.safetensors").exists()

    meta = json.loads((t.state_dir / "state.json").read_text())
    assert meta["step"] == k - 1
    again = trainer(c, tmp_path, data)
    again.load_state()
    assert again.step == k - 1
    for name, v in [*again.model.state_dict().items(), *again.ema.model.state_dict().items()]:
        assert torch.isfinite(v).all(), name
    # and training continues from there
    again.fit(stop_after_steps=1)
    assert again.step == k
    assert all(torch.isfinite(v).all() for v in again.model.state_dict().values())


# ----------------------------------------------------------------------------------------
# 3. DDP equivalence (torchrun, 2 CPU processes, gloo)
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "ddp_worker.py"), str(out)]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=TESTS.parent)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out: {e.stdout}\n{e.stderr}")
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"

    single = Trainer(ddp_config(), out / "single", teacher=micro_teacher(), train_ds=data[0], val_ds=data[1],
                     device=CPU, quiet=True)
    assert single.world == 1
    single.fit()
    return out, single


def test_ddp_two_processes_match_single_process(ddp_run):
    from safetensors.torch import load_file

    out, single = ddp_run
    info = json.loads((out / "ddp.json").read_text())
    assert info["world"] == 2 and info["step"] == single.step == 4
    worst = {}
    for what, ref in (("model", single.model.state_dict()), ("ema", single.ema.model.state_dict())):
        got = load_file(str(out / f"ddp_{what}.safetensors"))
        assert got.keys() == ref.keys()
        worst[what] = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        for k in ref:
            assert torch.allclose(got[k], ref[k], atol=1e-5, rtol=0), (what, k, float((got[k] - ref[k]).abs().max()))
    # the weights moved (so the comparison means something)
    torch.manual_seed(0)  # the Trainer's init: manual_seed(cfg.seed), then build
    init = build(MICRO_STUDENT)
    moved = max(float((single.model.state_dict()[k] - v).abs().max()) for k, v in init.state_dict().items())
    assert moved > 1e-3
    print(f"DDP vs single process: max |diff| model {worst['model']:.3g}, ema {worst['ema']:.3g}")


def test_ddp_validation_loss_matches_single_process(ddp_run):
    out, single = ddp_run
    info = json.loads((out / "ddp.json").read_text())
    ddp_val = [r["val_loss"] for r in info["history"]]
    one_val = [r["val_loss"] for r in single.history]
    assert ddp_val == pytest.approx(one_val, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------------------
# 4. EMA
# ----------------------------------------------------------------------------------------
def test_ema_copies_until_start_then_lerps():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4))
    beta, start = 0.75, 2
    ema = EMA(m, beta, start)
    assert ema.model is not m and not ema.model.training
    assert not any(p.requires_grad for p in ema.model.parameters())

    def perturb():
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))

    for step in (1, 2):  # step <= start: a copy of the online weights
        perturb()
        ema.update(m, step)
        assert_sd_equal(ema.model.state_dict(), m.state_dict(), f"copy at step {step}")
    for step in (3, 4):  # after: ema <- beta * ema + (1 - beta) * w
        prev = {k: v.clone() for k, v in ema.model.state_dict().items()}
        perturb()
        ema.update(m, step)
        for k, w in m.state_dict().items():
            expect = beta * prev[k] + (1 - beta) * w
            assert torch.allclose(ema.model.state_dict()[k], expect, atol=1e-6, rtol=0), (step, k)
            assert not torch.allclose(ema.model.state_dict()[k], w)
    # the online model is untouched by the EMA
    assert all(p.requires_grad for p in m.parameters())


def test_ema_lerps_batchnorm_statistics_and_copies_its_counter():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))
    ema = EMA(m, 0.5, 0)
    prev = {k: v.clone() for k, v in ema.model.state_dict().items()}
    m(torch.randn(3, 2, 8, 8) * 4 + 1)  # training mode: running statistics and the counter move
    ema.update(m, 1)
    got, online = ema.model.state_dict(), m.state_dict()
    assert got["1.num_batches_tracked"] == online["1.num_batches_tracked"] == 1
    for k in ("1.running_mean", "1.running_var", "0.weight"):
        torch.testing.assert_close(got[k], 0.5 * prev[k] + 0.5 * online[k])


def test_init_from_teacher_gives_mobile_blocks_the_standardised_kernels():
    from edgeseg.models import WSConv2d, build
    from edgeseg.train import init_from_teacher

    torch.manual_seed(0)
    teacher, student = build("tiny-teacher"), build("tiny-student-mobile")
    assert init_from_teacher(student, teacher) > 100
    t_conv, s_conv = teacher.downs[0].rb_x1.block1.proj, student.downs[0].rb_x1.block1.proj
    assert isinstance(t_conv, WSConv2d) and type(s_conv) is nn.Conv2d
    torch.testing.assert_close(s_conv.weight, t_conv.standardized_weight())
    torch.testing.assert_close(student.downs[0].gate.weight, teacher.downs[0].gate.weight)  # plain convs as they are
    # decoder stage j of the student is the teacher's stage j + 1 (one stage deeper)
    torch.testing.assert_close(student.ups[0].rb1.block1.proj.weight,
                               teacher.ups[1].rb1.block1.proj.standardized_weight())
    # a paper student keeps the teacher's raw WSConv2d weights (it standardises them itself)
    paper = build("tiny-student")
    init_from_teacher(paper, teacher)
    torch.testing.assert_close(paper.downs[0].rb_x1.block1.proj.weight, t_conv.weight)


def test_mobile_student_of_the_teachers_depth_starts_from_every_teacher_conv():
    from edgeseg.models import WSConv2d, build
    from edgeseg.train import init_from_teacher

    torch.manual_seed(0)
    # the teacher's four stages and widths with mobile blocks
    teacher, student = build("tiny-teacher"), build("tiny-teacher", blocks="mobile")
    init_from_teacher(student, teacher)
    t_mods = dict(teacher.named_modules())
    convs = [(n, m) for n, m in student.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) > 60
    for name, conv in convs:  # same depth: no stage shift, no conv left at its random init
        t_conv = t_mods[name]
        want = t_conv.standardized_weight() if isinstance(t_conv, WSConv2d) else t_conv.weight
        torch.testing.assert_close(conv.weight, want, msg=name)
    # the 8 x 8 bottleneck starts with the teacher's attention too
    torch.testing.assert_close(student.mid.lin_attn.fn.to_qkv.weight, teacher.mid.lin_attn.fn.to_qkv.weight)


def test_trainer_ema_before_start_equals_online_weights(tmp_path, data):
    t = trainer(cfg(kd="none", ema_start=100, epochs=1, save_every_steps=0), tmp_path, data)
    t.fit(stop_after_steps=2)
    assert_sd_equal(t.ema.model.state_dict(), t.model.state_dict(), "EMA before ema_start")


# ----------------------------------------------------------------------------------------
# 5. teacher / student checks
# ----------------------------------------------------------------------------------------
def test_student_kd_none_needs_no_teacher(tmp_path, data):
    t = trainer(cfg(kd="none"), tmp_path, data)
    assert t.teacher is None
    batch = next(iter(t._loader(0)))
    logs = t.train_step(batch)
    assert t.step == 1 and math.isfinite(logs["loss"]) and logs["kd"] == 0.0


def test_kd_none_with_a_teacher_only_initialises(tmp_path, data):
    teacher = micro_teacher()
    t = trainer(cfg(kd="none", init_from_teacher=True), tmp_path, data, teacher=teacher)
    ts = teacher.state_dict()
    copied = [k for k, v in t.model.state_dict().items() if k in ts and ts[k].shape == v.shape and torch.equal(ts[k], v)]
    assert copied, "init_from_teacher copied nothing"

    def boom(*_):
        raise AssertionError("the teacher ran although kd is none")

    teacher.forward = boom
    logs = t.train_step(next(iter(t._loader(0))))
    assert math.isfinite(logs["loss"]) and logs["kd"] == 0.0


@pytest.mark.parametrize("kd", ["efkd", "global"])
def test_student_kd_without_teacher_is_a_user_error(tmp_path, data, kd):
    with pytest.raises(EdgesegError, match="needs a teacher"):
        trainer(cfg(kd=kd), tmp_path, data)


@pytest.mark.parametrize("student_type", ["epsilon", "sample", "v_prediction"])
def test_kd_across_prediction_types_converts_the_teacher(tmp_path, data, student_type):
    """A student of another parameterisation learns from the teacher's output re-expressed in its own:
    with the student initialised to the teacher (same network) and sample -> other -> sample, the KD
    term compares like with like, so a student equal to an x0 teacher converted gets KD loss 0 only
    when the conversion is right."""
    teacher = micro_teacher()  # predicts "sample"
    t = trainer(cfg(kd="global", prediction_type=student_type), tmp_path, data, teacher=teacher)
    assert t.p.prediction_type == student_type and t.model.preset.prediction_type == student_type
    image, mask, d = next(iter(t._loader(0)))
    tt, noise = t._draw(len(image), tuple(mask.shape[1:]))
    x_t = t.schedule.q_sample(mask, tt, noise)
    with torch.no_grad():
        x0 = teacher(x_t, image, tt).clamp(-1, 1)
        eps = (x_t - t.schedule.sqrt_alphas_cumprod[tt].view(-1, 1, 1, 1) * x0) / \
            t.schedule.sqrt_one_minus_alphas_cumprod[tt].view(-1, 1, 1, 1)
        want = t.schedule.training_target(x0, eps, tt, student_type)
        if student_type == "sample":  # same parameterisation: the raw output, no conversion
            want = teacher(x_t, image, tt)

    class Echo(torch.nn.Module):  # a "student" that outputs exactly the converted teacher
        def forward(self, *_):
            return want

    _, terms = t.loss_on(Echo(), image, mask, d, tt, noise)
    assert terms["kd"] < 1e-8, terms


def test_prediction_type_override_is_saved_with_the_model(tmp_path, data):
    from edgeseg.checkpoint import load_model

    t = trainer(cfg(kd="none", prediction_type="v_prediction", epochs=1), tmp_path, data)
    t.fit()
    assert load_model(tmp_path / "student.safetensors").preset.prediction_type == "v_prediction"
    with pytest.raises(EdgesegError, match="prediction_type"):
        TrainConfig(prediction_type="x0")


def test_config_errors():
    with pytest.raises(EdgesegError, match="--kd"):
        TrainConfig(kd="bogus")
    with pytest.raises(EdgesegError, match="role"):
        TrainConfig(role="pupil")
    with pytest.raises(EdgesegError, match="unknown training settings"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    assert TrainConfig.from_dict(TrainConfig(betas=[0.5, 0.9]).to_dict()).betas == (0.5, 0.9)


def test_dataset_smaller_than_one_batch(tmp_path, data):
    t = trainer(cfg(kd="none", batch_size=64), tmp_path, data)
    with pytest.raises(EdgesegError, match="fewer than one batch"):
        t.fit()


def test_teacher_role_trains(tmp_path, data, monkeypatch):
    monkeypatch.setattr(edgeseg.viz, "plot_curves", _REAL_PLOT_CURVES)
    t = trainer(cfg(role="teacher", preset=MICRO_TEACHER, kd="none", epochs=1, save_every_steps=0), tmp_path, data)
    t.fit()
    assert t.step == 4 and len(t.history) == 1 and math.isfinite(t.history[0]["val_loss"])
    for name in ("teacher.safetensors", "teacher.json", "teacher-log.jsonl", "teacher-curves.png"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "teacher-log.jsonl").read_text().splitlines()[0])["step"] == 4


def test_init_from_teacher_copies_matching_stages():
    """The tiny student starts from the teacher's shared stages; decoder stages are shifted."""
    from edgeseg.models import build
    from edgeseg.train import init_from_teacher

    student, teacher = build("tiny-student"), build("tiny-teacher")
    copied = init_from_teacher(student, teacher)
    s, t = student.state_dict(), teacher.state_dict()
    assert 0 < copied < len(s)
    assert torch.equal(s["downs.0.rb_x1.block1.proj.weight"], t["downs.0.rb_x1.block1.proj.weight"])
    # student decoder stage 0 (deepest, stage 2) is the teacher's decoder stage 1
    assert torch.equal(s["ups.0.rb1.block1.proj.weight"], t["ups.1.rb1.block1.proj.weight"])
    assert torch.equal(s["final_conv.weight"], t["final_conv.weight"])


# ----------------------------------------------------------------------------------------
# 6. few-step training: sampler-timestep focus, x0 segmentation loss, wall-time budget
# ----------------------------------------------------------------------------------------
def test_focus_timesteps_draws_the_shipped_samplers_timesteps(tmp_path, data):
    from edgeseg.defaults import sampler_defaults
    from edgeseg.diffusion import DDIMScheduler

    t_all = trainer(cfg(kd="none", focus_timesteps=1.0), tmp_path / "a", data)
    sched = DDIMScheduler(t_all.schedule, prediction_type=t_all.p.prediction_type)
    sched.set_timesteps(sampler_defaults(t_all.p.prediction_type)[0])
    t, _ = t_all._draw(4096, (1, 8, 8))
    assert set(t.tolist()) == set(sched.timesteps.tolist())
    t_half = trainer(cfg(kd="none", focus_timesteps=0.5), tmp_path / "b", data)
    t, _ = t_half._draw(4096, (1, 8, 8))
    share = torch.isin(t, sched.timesteps).float().mean().item()
    assert 0.45 < share < 0.56  # half focused, plus the uniform draws that land there by chance
    # off (the default): the stream of draws is the one runs made before the option existed
    g = torch.Generator().manual_seed(1)
    t0, _ = trainer(cfg(kd="none"), tmp_path / "c", data)._draw(16, (1, 8, 8))
    assert torch.equal(t0, torch.randint(0, t_all.schedule.T, (16,), generator=g))


def test_x0_segmentation_loss_term_trains(tmp_path, data):
    from edgeseg.losses import x0_segmentation_loss

    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    m = mask * 2 - 1
    assert x0_segmentation_loss(3 * m, m) < 0.05 < 1.5 < x0_segmentation_loss(-3 * m, m)
    x0 = torch.zeros(2, 1, 8, 8, requires_grad=True)
    x0_segmentation_loss(x0, m).backward()
    assert (x0.grad[mask > 0] < 0).all() and (x0.grad[mask == 0] > 0).all()  # pushes x0 toward the mask
    t = trainer(cfg(kd="none", w_seg=0.5), tmp_path, data)
    logs = t.train_step(next(iter(t._loader(0))))
    assert "seg" in logs and math.isfinite(logs["seg"]) and logs["seg"] > 0
    plain = trainer(cfg(kd="none"), tmp_path / "plain", data).train_step(next(iter(t._loader(0))))
    assert "seg" not in plain
    assert logs["loss"] == pytest.approx(plain["loss"] + 0.5 * logs["seg"], rel=1e-5)
    # a teacher takes the same term (its K = 1 prediction is the mask a phone shows)
    tt = trainer(cfg(role="teacher", w_seg=0.5), tmp_path / "teacher", data)
    t_logs = tt.train_step(next(iter(tt._loader(0))))
    t_plain = trainer(cfg(role="teacher"), tmp_path / "tplain", data).train_step(next(iter(tt._loader(0))))
    assert "seg" not in t_plain and t_logs["loss"] == pytest.approx(t_plain["loss"] + 0.5 * t_logs["seg"], rel=1e-5)


def test_a_removed_setting_loads_at_its_default_and_is_refused_otherwise():
    """Run states and checkpoints written while sampler distillation existed carry w_sampler_kd: 0.0."""
    from edgeseg.config import check_resume
    from edgeseg.errors import SettingsError

    saved = {**cfg().to_dict(), "w_sampler_kd": 0.0}
    assert TrainConfig.from_dict(saved) == cfg()
    assert check_resume(saved, cfg().to_dict()) == {}
    with pytest.raises(SettingsError, match="w_sampler_kd = 0.5 .*sampler distillation.* commit 3a06f44"):
        TrainConfig.from_dict({**saved, "w_sampler_kd": 0.5})
    with pytest.raises(SettingsError, match="unknown training settings"):
        TrainConfig.from_dict({**saved, "w_sampler": 0.0})


def test_feature_kd_pairs_stages_by_level_and_adds_its_term(tmp_path, data):
    from edgeseg.losses import feature_kd_loss
    from edgeseg.models import stage_outputs

    teacher, student = micro_teacher(), build(MICRO_STUDENT)
    s = student.preset.image_size
    x, g, t = torch.randn(2, 1, s, s), torch.rand(2, 3, s, s), torch.tensor([3, 700])
    with torch.no_grad(), stage_outputs(student) as fs, stage_outputs(teacher) as ft:
        student(x, g, t)
        teacher(x, g, t)
    shared = {k for k in fs if k in ft and fs[k].shape == ft[k].shape}
    assert {"enc0.h", "enc0.b", "dec0"} <= shared  # the deeper teacher's skips and top decoder line up
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])  # taps removed
    assert float(feature_kd_loss(ft, ft)) == 0.0 < float(feature_kd_loss(fs, ft))
    assert float(feature_kd_loss({"mid": torch.ones(1, 2, 3, 3)}, {"mid": torch.zeros(1, 2, 4, 4)})) == 0.0
    batch = next(iter(trainer(cfg(kd="none"), tmp_path / "loader", data)._loader(0)))
    tr = trainer(cfg(kd="none", w_feat=0.5, init_from_teacher=True), tmp_path / "feat", data, teacher=teacher)
    logs = tr.train_step(batch)
    assert logs["feat"] > 0 and logs["kd"] == 0.0
    plain = trainer(cfg(kd="none", init_from_teacher=True), tmp_path / "plain", data,
                    teacher=micro_teacher()).train_step(batch)
    assert "feat" not in plain
    assert logs["loss"] == pytest.approx(plain["loss"] + 0.5 * logs["feat"], rel=1e-5)


def test_max_seconds_stops_training_and_survives_resume(tmp_path, data):
    c = cfg(kd="none", epochs=1000, max_seconds=1.0, save_every_steps=1)
    t = trainer(c, tmp_path, data)
    t.fit()
    assert t.step < 1000 * t._steps_per_epoch()  # stopped by the clock (how many steps depends on the CPU)
    assert t.train_seconds >= 1.0
    saved = json.loads((t.state_dir / "state.json").read_text())
    assert saved["train_seconds"] >= 1.0
    final = json.loads((tmp_path / "student.json").read_text())
    assert final["train_seconds"] == pytest.approx(t.train_seconds, abs=0.1)
    # resumed with the budget already spent: no further step
    again = trainer(c, tmp_path, data)
    again.load_state()
    steps = again.step
    again.fit()
    assert again.step == steps
    with pytest.raises(EdgesegError, match="max_seconds"):
        TrainConfig(max_seconds=-1)


def test_cosine_schedule_anneals_over_the_run_and_ignores_the_plateau(tmp_path, data):
    """lr_schedule=cosine: the step's learning rate follows the run's progress down to LR_FLOOR x lr;
    the plateau rule stays out of it."""
    from edgeseg.train import LR_FLOOR, cosine_lr_factor

    assert cosine_lr_factor(0.0) == 1.0 and cosine_lr_factor(1.0) == pytest.approx(LR_FLOOR)
    assert cosine_lr_factor(0.5) == pytest.approx((1 + LR_FLOOR) / 2) and cosine_lr_factor(2.0) == cosine_lr_factor(1.0)
    t = trainer(cfg(kd="none", lr_schedule="cosine", epochs=3, save_every_steps=0), tmp_path, data)
    total = t.total_steps()
    lrs = []
    t.fit(on_epoch_end=lambda tr, rec: lrs.append(tr.lr))
    assert t.step == total and len(lrs) == 3
    # the lr written by each epoch's last step: that step's progress (step - 1 of total done before it)
    per = t._steps_per_epoch()
    assert lrs == pytest.approx([1e-3 * cosine_lr_factor((e * per - 1) / total) for e in (1, 2, 3)])
    assert t.plateau.last_epoch == 0  # the plateau rule never saw a validation loss
    with pytest.raises(EdgesegError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")
