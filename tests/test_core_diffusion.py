"""edgeseg.diffusion: the schedule (golden parity), the x0/eps/v algebra, DDPM and DDIM steps,
trailing timesteps, and sample_masks with an oracle network."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgeseg.diffusion import (
    PREDICTION_TYPES,
    DDIMScheduler,
    DDPMScheduler,
    NoiseSchedule,
    SchedulerOutput,
    sample_masks,
)

T = 250
TYPES = ("epsilon", "sample", "v_prediction")


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule()


def abar64(t: int) -> float:
    """alphas_cumprod in float64 straight from the definition (linear betas 4e-4 .. 0.08)."""
    if t < 0:
        return 1.0
    betas = np.linspace(4e-4, 0.08, T, dtype=np.float64)
    return float(np.prod(1.0 - betas[: t + 1]))


def target_of(kind: str, x0, eps, abar_t: float):
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    return math.sqrt(abar_t) * eps - math.sqrt(1 - abar_t) * x0


# ----------------------------------------------------------------------------------------
# golden parity: schedule arrays and q_sample
# ----------------------------------------------------------------------------------------
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "posterior_variance", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")


@pytest.mark.parametrize("key", SCHEDULE_KEYS)
def test_golden_schedule_arrays(golden, sched, key):
    ours = getattr(sched, key)
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.float32 and ours.shape == (T,)
    ref = golden[key]
    err = float(np.abs(ours.numpy() - ref).max())
    rel = float((np.abs(ours.numpy() - ref) / np.maximum(np.abs(ref), 1e-30)).max())
    print(f"[golden] max |error| {key}: {err:.3e} (rel {rel:.3e})")
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=0)
    assert sched.T == int(golden["T"]) == T
    assert float(sched.posterior_variance[0]) == 0.0


def test_golden_q_sample(golden, sched):
    x0, noise, t = (torch.from_numpy(golden[k]) for k in ("masks", "noise", "t"))
    xt = sched.q_sample(x0, t, noise)
    err = float((xt.numpy() - golden["x_t"]).__abs__().max())
    print(f"[golden] max |error| x_t: {err:.3e}")
    assert xt.dtype == torch.float32 and err <= 1e-6


def test_schedule_against_float64_definition(sched):
    for t in (0, 1, 62, 137, 249):
        assert float(sched.alphas_cumprod[t]) == pytest.approx(abar64(t), rel=1e-5, abs=1e-9)
    assert float(sched.betas[0]) == pytest.approx(4e-4) and float(sched.betas[-1]) == pytest.approx(0.08)


# ----------------------------------------------------------------------------------------
# targets and the x0 / eps algebra
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TYPES)
def test_training_target_round_trip(sched, kind):
    gen = torch.Generator().manual_seed(0)
    B = 6
    mask = torch.where(torch.rand(B, 1, 16, 16, generator=gen) > 0.5, 1.0, -1.0)
    soft = torch.rand(B, 1, 16, 16, generator=gen) * 1.8 - 0.9  # inside the clip range
    t = torch.tensor([0, 1, 62, 137, 200, 249])
    for x0 in (mask, soft):
        noise = torch.randn(B, 1, 16, 16, generator=gen)
        xt = sched.q_sample(x0, t, noise)
        target = sched.training_target(x0, noise, t, kind)
        x0_hat, eps_hat = sched.to_x0_eps(target, xt, t, kind)
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-4)
        torch.testing.assert_close(eps_hat, noise, rtol=0, atol=2e-4)
    # v definition with numbers
    if kind == "v_prediction":
        tt = 137
        v = sched.training_target(torch.tensor([[0.5]]), torch.tensor([[-1.0]]), torch.tensor([tt]), kind)
        a = abar64(tt)
        assert float(v) == pytest.approx(math.sqrt(a) * -1.0 - math.sqrt(1 - a) * 0.5, rel=1e-5)


def test_to_x0_eps_clips_and_rederives(sched):
    t = 100
    xt = torch.tensor([[2.0, -3.0, 0.1]])
    x0, eps = sched.to_x0_eps(torch.tensor([[1.7, -1.2, 0.3]]), xt, t, "sample")
    assert x0.tolist()[0] == pytest.approx([1.0, -1.0, 0.3])
    sa, s1 = math.sqrt(abar64(t)), math.sqrt(1 - abar64(t))
    torch.testing.assert_close(eps, (xt - sa * x0) / s1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["eps", "x0", "v", "", "EPSILON"])
def test_invalid_prediction_type_raises(sched, bad):
    x = torch.zeros(1, 1, 4, 4)
    t = torch.tensor([3])
    with pytest.raises(ValueError):
        DDIMScheduler(prediction_type=bad)
    with pytest.raises(ValueError):
        DDPMScheduler(prediction_type=bad)
    with pytest.raises(ValueError):
        sched.training_target(x, x, t, bad)
    with pytest.raises(ValueError):
        sched.to_x0_eps(x, x, t, bad)
    assert set(PREDICTION_TYPES) == set(TYPES)


# ----------------------------------------------------------------------------------------
# DDIM: trailing timesteps
# ----------------------------------------------------------------------------------------
EXPECTED = {
    1: [249],
    2: [249, 124],
    3: [249, 166, 82],
    4: [249, 187, 124, 61],
    7: [249, 213, 178, 142, 106, 70, 35],
    10: [249, 224, 199, 174, 149, 124, 99, 74, 49, 24],
}


def _check_timesteps(s: DDIMScheduler, K: int) -> list[int]:
    s.set_timesteps(K)
    ts = [int(v) for v in s.timesteps]
    assert len(ts) == K and s.num_inference_steps == K, f"K={K}: {len(ts)} timesteps, tail {ts[-3:]}"
    assert ts[0] == T - 1, f"K={K}: first step {ts[0]}"
    assert all(a > b for a, b in zip(ts, ts[1:])), f"K={K}: not strictly decreasing"
    assert 0 <= ts[-1], f"K={K}: negative timestep {ts[-1]}"
    for a, b in zip(ts, ts[1:]):
        assert s.previous_timestep(a) == b  # taken from the list, never a - T // K
    assert s.previous_timestep(ts[-1]) == -1
    return ts


@pytest.mark.parametrize("K", [1, 2, 3, 4, 7, 10, 61, 250])
def test_ddim_trailing_timesteps(K):
    ts = _check_timesteps(DDIMScheduler(), K)
    if K in EXPECTED:
        assert ts == EXPECTED[K]
    if K == 250:
        assert ts == list(range(249, -1, -1))
    if K == 7:  # K does not divide T: t - T // K would give 214, not 213
        s = DDIMScheduler()
        s.set_timesteps(7)
        assert s.previous_timestep(249) == 213 != 249 - T // 7
        assert s.previous_timestep(35) == -1


def test_ddim_trailing_timesteps_every_K():
    """Every K in 1..T gives exactly K distinct timesteps in [0, T-1] (float arange pitfalls)."""
    s = DDIMScheduler()
    bad = []
    for K in range(1, T + 1):
        s.set_timesteps(K)
        ts = [int(v) for v in s.timesteps]
        if len(ts) != K or ts[0] != T - 1 or min(ts) < 0 or len(set(ts)) != K:
            bad.append((K, len(ts), ts[-2:]))
    assert not bad, f"set_timesteps(K) is wrong for {len(bad)} values of K: {bad}"


def test_ddim_set_timesteps_rejects_bad_K():
    s = DDIMScheduler()
    for K in (0, -1, T + 1):
        with pytest.raises(ValueError):
            s.set_timesteps(K)


# ----------------------------------------------------------------------------------------
# DDIM: one step against the hand-derived formula
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TYPES)
def test_ddim_step_hand_derived(kind):
    s = DDIMScheduler(prediction_type=kind)
    s.set_timesteps(10)
    t, t_prev = 174, 149  # the 4th and 5th of [249, 224, 199, 174, 149, ...]
    assert s.previous_timestep(t) == t_prev
    a_t, a_p = abar64(t), abar64(t_prev)
    coeffs = s.step_coefficients(t)
    assert coeffs == pytest.approx((math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_p), math.sqrt(1 - a_p)), rel=1e-5)

    x0 = np.array([0.6, -1.0, 1.0, -0.25], np.float64)
    eps = np.array([-0.3, 1.2, 0.05, -2.0], np.float64)
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps

    # 1) the exact target of this type: x_prev = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev) * eps
    out = target_of(kind, x0, eps, a_t)
    want = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps
    got = s.step(torch.tensor(out, dtype=torch.float32), t, torch.tensor(x_t, dtype=torch.float32)).prev_sample
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=2e-5)

    # 2) an imperfect prediction: x0_hat from the output, clipped, eps re-derived from x0_hat
    out2 = out + np.array([0.05, -0.1, 0.2, 0.01])
    if kind == "epsilon":
        x0_hat = (x_t - math.sqrt(1 - a_t) * out2) / math.sqrt(a_t)
    elif kind == "sample":
        x0_hat = out2
    else:
        x0_hat = math.sqrt(a_t) * x_t - math.sqrt(1 - a_t) * out2
    x0_hat = np.clip(x0_hat, -1.0, 1.0)
    eps_hat = (x_t - math.sqrt(a_t) * x0_hat) / math.sqrt(1 - a_t)
    want2 = math.sqrt(a_p) * x0_hat + math.sqrt(1 - a_p) * eps_hat
    got2 = s.step(torch.tensor(out2, dtype=torch.float32), t, torch.tensor(x_t, dtype=torch.float32)).prev_sample
    np.testing.assert_allclose(got2.double().numpy(), want2, rtol=0, atol=5e-5)


def test_ddim_step_numbers_epsilon():
    """The same step written with literal numbers (t=174 -> 149, K=10)."""
    a_t, a_p = abar64(174), abar64(149)
    # abar from the schedule definition, printed once for the record
    print(f"abar_174={a_t:.8f} abar_149={a_p:.8f}")
    s = DDIMScheduler()
    s.set_timesteps(10)
    x0, eps = 0.6, -0.3
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    got = float(s.step(torch.tensor([eps]), 174, torch.tensor([x_t])).prev_sample)
    assert got == pytest.approx(math.sqrt(a_p) * 0.6 + math.sqrt(1 - a_p) * -0.3, abs=2e-5)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("K", [1, 4])
def test_ddim_last_step_returns_x0(kind, K):
    s = DDIMScheduler(prediction_type=kind)
    s.set_timesteps(K)
    t = int(s.timesteps[-1])
    assert s.previous_timestep(t) == -1
    a_t = abar64(t)
    x0 = torch.tensor([0.6, -1.0, 1.0, -0.25], dtype=torch.float64)
    eps = torch.tensor([-0.3, 1.2, 0.05, -2.0], dtype=torch.float64)
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    out = target_of(kind, x0, eps, a_t)
    got = s.step(out.float(), t, x_t.float()).prev_sample
    torch.testing.assert_close(got.double(), x0, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------
# DDPM
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TYPES)
def test_ddpm_step_at_zero_is_posterior_mean_x0(kind, sched):
    s = DDPMScheduler(prediction_type=kind)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.where(torch.rand(2, 1, 8, 8, generator=gen) > 0.5, 1.0, -1.0)
    eps = torch.randn(2, 1, 8, 8, generator=gen)
    a0 = float(sched.alphas_cumprod[0])
    x_t = math.sqrt(a0) * x0 + math.sqrt(1 - a0) * eps
    out = target_of(kind, x0, eps, a0)
    got = s.step(out, 0, x_t, generator=gen).prev_sample
    torch.testing.assert_close(got, x0, rtol=0, atol=1e-4)
    # no noise is added at t = 0, whatever the generator
    assert torch.equal(got, s.step(out, 0, x_t, generator=torch.Generator().manual_seed(99)).prev_sample)


def test_ddpm_step_hand_derived(sched):
    s = DDPMScheduler(prediction_type="sample")
    t = 137
    a_t, a_p = abar64(t), abar64(t - 1)
    beta = float(np.linspace(4e-4, 0.08, T)[t])
    x0 = torch.tensor([0.5, -0.8])
    x_t = torch.tensor([0.3, 1.1])
    z = torch.tensor([1.0, -0.5])
    c1 = beta * math.sqrt(a_p) / (1 - a_t)
    c2 = (1 - a_p) * math.sqrt(1 - beta) / (1 - a_t)
    var = beta * (1 - a_p) / (1 - a_t)
    want = c1 * x0.double() + c2 * x_t.double() + math.sqrt(var) * z.double()
    got = s.step(x0, t, x_t, noise=z).prev_sample
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_ddpm_deterministic_with_fixed_noise():
    s = DDPMScheduler()
    gen = torch.Generator().manual_seed(0)
    out, x_t, z = (torch.randn(2, 1, 8, 8, generator=gen) for _ in range(3))
    a, b = s.step(out, 120, x_t, noise=z).prev_sample, s.step(out, 120, x_t, noise=z.clone()).prev_sample
    assert torch.equal(a, b)
    c = s.step(out, 120, x_t, generator=torch.Generator().manual_seed(5)).prev_sample
    d = s.step(out, 120, x_t, generator=torch.Generator().manual_seed(5)).prev_sample
    assert torch.equal(c, d) and not torch.equal(a, c)


def test_ddpm_runs_all_steps():
    s = DDPMScheduler()
    s.set_timesteps()
    assert s.timesteps.tolist() == list(range(T - 1, -1, -1))
    s.set_timesteps(T)
    with pytest.raises(ValueError):
        s.set_timesteps(10)


# ----------------------------------------------------------------------------------------
# the shared step call: SchedulerOutput, DDIM eta
# ----------------------------------------------------------------------------------------
def _step_inputs(seed=0, shape=(2, 1, 6, 5)):
    g = torch.Generator().manual_seed(seed)
    # large outputs: the x0 clip is active on part of the map
    return (torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g))


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "ddim-eta"])
def test_scheduler_output_fields(sampler, kind):
    """Both schedulers return SchedulerOutput; pred_original_sample is the (clipped) x0 the step used."""
    if sampler == "ddpm":
        s = DDPMScheduler(prediction_type=kind)
    else:
        s = DDIMScheduler(prediction_type=kind, eta=0.7 if sampler == "ddim-eta" else 0.0)
        s.set_timesteps(5)
    out, x_t, z = _step_inputs()
    for t in (int(s.timesteps[0]), int(s.timesteps[len(s.timesteps) // 2])):
        r = s.step(out, t, x_t, noise=z)
        assert isinstance(r, SchedulerOutput)
        x0, eps = s.schedule.to_x0_eps(out, x_t, t, kind)
        assert torch.equal(r.pred_original_sample, x0)
        assert float(r.pred_original_sample.abs().max()) <= 1.0 and bool((x0.abs() == 1.0).any())
        if sampler == "ddpm":
            sc = s.schedule
            want = sc.posterior_mean_coef1[t] * x0 + sc.posterior_mean_coef2[t] * x_t + sc.posterior_std(t) * z
        else:
            _, _, c_x0, c_eps, sigma = s.update_coefficients(t)
            want = c_x0 * x0 + c_eps * eps + sigma * z if sigma > 0 else c_x0 * x0 + c_eps * eps
        assert torch.equal(r.prev_sample, want)


@pytest.mark.parametrize("kind", TYPES)
def test_ddim_eta0_unchanged(kind):
    """eta = 0 (the default) is the deterministic DDIM step, bit for bit, and draws nothing."""
    s = DDIMScheduler(prediction_type=kind)
    assert s.eta == 0.0
    s.set_timesteps(6)
    out, x_t, _ = _step_inputs(1)
    for t in s.timesteps.tolist():
        x0, eps = s.schedule.to_x0_eps(out, x_t, t, kind)
        _, _, sa_prev, s1_prev = s.step_coefficients(t)
        assert s.update_coefficients(t)[2:] == (sa_prev, s1_prev, 0.0)
        g = torch.Generator().manual_seed(4)
        state = g.get_state()
        r = s.step(out, t, x_t, generator=g)
        assert torch.equal(r.prev_sample, sa_prev * x0 + s1_prev * eps)
        assert torch.equal(g.get_state(), state)  # no noise drawn
        assert torch.equal(r.prev_sample, s.step(out, t, x_t).prev_sample)
    # eta given to set_timesteps, then back to 0
    s.set_timesteps(6, eta=0.5)
    assert s.eta == 0.5
    s.set_timesteps(6, eta=0.0)
    t = int(s.timesteps[0])
    assert torch.equal(s.step(out, t, x_t, generator=torch.Generator().manual_seed(1)).prev_sample,
                       s.step(out, t, x_t, generator=torch.Generator().manual_seed(2)).prev_sample)


def test_ddim_eta_rejects_bad_values():
    for eta in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            DDIMScheduler(eta=eta)
        with pytest.raises(ValueError):
            DDIMScheduler().set_timesteps(4, eta=eta)


@pytest.mark.parametrize("kind", TYPES)
def test_ddim_eta_stochastic_and_reproducible(kind):
    s = DDIMScheduler(prediction_type=kind, eta=1.0)
    s.set_timesteps(10)
    out, x_t, _ = _step_inputs(2)
    t = 174
    a = s.step(out, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    b = s.step(out, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    c = s.step(out, t, x_t, generator=torch.Generator().manual_seed(8)).prev_sample
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the draw is torch.randn(sample.shape, generator) exactly
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, s.step(out, t, x_t, noise=z).prev_sample)
    # and differs from the deterministic step
    s0 = DDIMScheduler(prediction_type=kind)
    s0.set_timesteps(10)
    assert not torch.equal(a, s0.step(out, t, x_t).prev_sample)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_step_hand_derived(eta):
    """x_prev = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - a_p) / (1 - a_t)) sqrt(1 - a_t / a_p)."""
    s = DDIMScheduler(prediction_type="epsilon", eta=eta)
    s.set_timesteps(10)
    t, t_prev = 174, 149
    a_t, a_p = abar64(t), abar64(t_prev)
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
    assert s.update_coefficients(t)[4] == pytest.approx(sigma, rel=1e-5)
    x0 = np.array([0.6, -1.0, 1.0, -0.25], np.float64)
    eps = np.array([-0.3, 1.2, 0.05, -2.0], np.float64)
    z = np.array([0.4, -1.1, 2.0, 0.0], np.float64)
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    want = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma**2) * eps + sigma * z
    f = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    r = s.step(f(eps), t, f(x_t), noise=f(z))
    np.testing.assert_allclose(r.prev_sample.double().numpy(), want, rtol=0, atol=5e-5)
    np.testing.assert_allclose(r.pred_original_sample.double().numpy(), x0, rtol=0, atol=5e-5)


def test_ddim_eta1_all_steps_is_ddpm_variance(sched):
    """eta = 1 on all T steps: sigma_t^2 is the DDPM posterior variance."""
    s = DDIMScheduler(eta=1.0)
    s.set_timesteps(T)
    for t in (249, 137, 1):
        sigma = s.update_coefficients(t)[4]
        assert sigma**2 == pytest.approx(float(sched.posterior_variance[t]), rel=1e-4)


@pytest.mark.parametrize("K", [1, 3])
def test_ddim_eta_last_step_is_x0_without_draw(K):
    s = DDIMScheduler(prediction_type="sample", eta=1.0)
    s.set_timesteps(K)
    t = int(s.timesteps[-1])
    out, x_t, _ = _step_inputs(3)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    r = s.step(out.clamp(-1, 1), t, x_t, generator=g)
    assert s.update_coefficients(t)[4] == 0.0
    assert torch.equal(g.get_state(), state)
    assert torch.equal(r.prev_sample, r.pred_original_sample)


# ----------------------------------------------------------------------------------------
# sample_masks with an oracle network
# ----------------------------------------------------------------------------------------
class Oracle:
    """Knows the true mask (stored in channel 0 of the image) and returns the exact target."""

    def __init__(self, kind: str, schedule: NoiseSchedule):
        self.kind, self.s, self.calls, self.batch_sizes = kind, schedule, 0, []

    def __call__(self, x, g, t):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        assert t.shape == (x.shape[0],) and t.dtype == torch.long
        x0 = g[:, :1]
        sa = self.s.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        s1 = self.s.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - sa * x0) / s1
        if self.kind == "epsilon":
            return eps
        if self.kind == "sample":
            return x0
        return sa * eps - s1 * x0


def _oracle_images(B=2, H=24, W=20):
    gen = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    masks = torch.stack(
        [torch.where(((yy - 8 - 4 * b) ** 2 + (xx - 10) ** 2) < 30 + 20 * b, 1.0, -1.0) for b in range(B)]
    )[:, None]
    image = torch.cat([masks, torch.rand(B, 2, H, W, generator=gen)], dim=1)
    return masks, image


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("K", [1, 4])
def test_sample_masks_ddim_oracle_recovers_mask(kind, K):
    masks, image = _oracle_images()
    s = DDIMScheduler(prediction_type=kind)
    s.set_timesteps(K)
    oracle = Oracle(kind, s.schedule)
    N = 3
    mean, std = sample_masks(oracle, image, s, ensemble=N, generator=torch.Generator().manual_seed(0))
    assert mean.shape == std.shape == (2, 1, 24, 20)
    assert oracle.calls == K and oracle.batch_sizes == [2 * N] * K  # ensemble as a batch, not a loop
    torch.testing.assert_close(mean, masks, rtol=0, atol=1e-4)
    assert float(std.max()) < 1e-4
    assert torch.equal(torch.where(mean > 0, 1.0, -1.0), masks)


def test_sample_masks_ddpm_oracle_and_fixed_noise():
    masks, image = _oracle_images(B=1, H=12, W=12)
    s = DDPMScheduler(prediction_type="epsilon")
    oracle = Oracle("epsilon", s.schedule)
    noise = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    m1, sd1 = sample_masks(oracle, image, s, ensemble=2, generator=torch.Generator().manual_seed(2), noise=noise)
    m2, _ = sample_masks(oracle, image, s, ensemble=2, generator=torch.Generator().manual_seed(2), noise=noise)
    assert oracle.calls == 2 * T
    assert torch.equal(m1, m2)  # same initial noise and generator -> identical run
    torch.testing.assert_close(m1, masks, rtol=0, atol=1e-4)
    assert float(sd1.max()) < 1e-4


def test_sample_masks_reports_progress():
    masks, image = _oracle_images(B=1)
    s = DDIMScheduler(prediction_type="sample")
    s.set_timesteps(3)
    seen = []
    sample_masks(Oracle("sample", s.schedule), image, s, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_sample_masks_ddim_eta_reproducible_from_generator():
    """With eta > 0 sample_masks feeds its generator to the DDIM step: same seed, same run."""
    _, image = _oracle_images(B=1, H=12, W=12)
    noise = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))

    def net(x, g, t):  # not an oracle: the stochastic term must matter
        return 0.5 * x + 0.1 * g[:, :1]

    def run(eta, seed):
        s = DDIMScheduler(prediction_type="epsilon", eta=eta)
        s.set_timesteps(4)
        return sample_masks(net, image, s, ensemble=2, generator=torch.Generator().manual_seed(seed), noise=noise)

    (m1, s1), (m2, s2), (m3, _) = run(0.8, 5), run(0.8, 5), run(0.8, 6)
    assert torch.equal(m1, m2) and torch.equal(s1, s2) and not torch.equal(m1, m3)
    (d1, _), (d2, _) = run(0.0, 5), run(0.0, 6)
    assert torch.equal(d1, d2) and not torch.equal(d1, m1)


def test_sample_masks_takes_any_scheduler_with_the_shared_step():
    """No isinstance in the loop: a duck-typed scheduler gets the same call as DDPM / DDIM."""
    _, image = _oracle_images(B=1, H=8, W=8)
    calls = []

    class Sched:
        timesteps = torch.tensor([3, 1])

        def step(self, model_output, timestep, sample, generator=None):
            calls.append((timestep, generator))
            return SchedulerOutput(sample * 0.5, sample)

    g = torch.Generator().manual_seed(0)
    noise = torch.ones(1, 1, 8, 8)
    mean, _ = sample_masks(lambda x, g_, t: x, image, Sched(), generator=g, noise=noise)
    assert calls == [(3, g), (1, g)]
    torch.testing.assert_close(mean, torch.full((1, 1, 8, 8), 0.25))
