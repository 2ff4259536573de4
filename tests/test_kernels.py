"""Fused Triton kernels vs the torch reference and float64, on CPU under TRITON_INTERPRET=1.

The interpreter must be switched on before Triton is imported; `edgeseg.kernels` imports Triton
lazily (on the first kernel launch), so setting the variable here is enough.

On a GPU, `EDGESEG_TEST_DEVICE=cuda` runs the same checks with the kernels compiled for the device
(bench/gpu.sh does): the kernels get CUDA tensors, the references stay on the CPU (except the
seeded DDPM noise draw, which needs one generator for both) and results are compared there.
"""
from __future__ import annotations

import os

DEVICE = os.environ.get("EDGESEG_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ast  # noqa: E402
import importlib  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from edgeseg.boundary import distance_map, t_power  # noqa: E402
from edgeseg.boundary import t_power as core_t_power  # noqa: E402
from edgeseg.diffusion import (  # noqa: E402
    PREDICTION_TYPES,
    DDIMScheduler,
    DDPMScheduler,
    SchedulerOutput,
    sample_masks,
)
from edgeseg import losses as core_losses  # noqa: E402
from edgeseg.losses import student_objective  # noqa: E402
from edgeseg.sampling import FusedDDIMScheduler, FusedDDPMScheduler, make_scheduler  # noqa: E402

import edgeseg.kernels as K  # noqa: E402

# `edgeseg.kernels.fused_distill_loss` is the function; the op modules by their full names:
FDL = importlib.import_module("edgeseg.kernels.fused_distill_loss")
FSS = importlib.import_module("edgeseg.kernels.fused_sampler_step")

pytestmark = pytest.mark.skipif(not K.triton_available(), reason="triton is not installed")
if DEVICE != "cpu" and not torch.cuda.is_available():  # fail, not skip: a GPU run must run
    raise RuntimeError(f"EDGESEG_TEST_DEVICE={DEVICE}, but torch sees no CUDA device")

T = 250
GAMMA_KD, GAMMA_B = 1.5, 0.2


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def _blob(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random star-shaped lesion mask (+1 / -1) covering well over 1% of the image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ang = np.arctan2(yy - cy, xx - cx)
    r0 = rng.uniform(0.2, 0.35) * min(h, w)
    r = r0 * (1 + 0.2 * np.sin(3 * ang + rng.uniform(0, 6)) + 0.1 * np.cos(5 * ang))
    inside = np.hypot(yy - cy, xx - cx) <= r
    return np.where(inside, 1.0, -1.0).astype(np.float32)


def _make_inputs(B, H, W, dtype=torch.float32, seed=0, ones_sample=1):
    """Maps for B samples: distance maps of random blobs, one all-ones sample (the 1% rule)."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    d = []
    for b in range(B):
        if b == ones_sample:
            d.append(np.ones((H, W), np.float32))
        else:
            d.append(distance_map(_blob(H, W, rng)))
    d = torch.from_numpy(np.stack(d)[:, None])
    s = torch.randn((B, 1, H, W), generator=g).to(dtype)
    te = torch.randn((B, 1, H, W), generator=g).to(dtype)
    y = torch.randn((B, 1, H, W), generator=g).to(dtype)
    ts = [0, T - 1, 137, 1, 62, 249, 31]
    t = torch.tensor([ts[b % len(ts)] for b in range(B)], dtype=torch.int64)
    return s, te, y, d, t


def _reference(s, te, y, d, t, tau, weights=(1.0, 0.25, 0.25)):
    """Torch reference (edgeseg.losses.student_objective) with autograd: values and d total/d s."""
    s = s.detach().clone().requires_grad_(True)
    total, terms = student_objective(s, te, y, d, t, T, kd="efkd", tau=tau, weights=weights)
    total.backward()
    return total.detach(), {k: v.detach() for k, v in terms.items()}, s.grad


def _float64(s, te, y, d, t, tau, lambda_e=5.0, lambda_b=2.0, weights=(1.0, 0.25, 0.25)):
    """Everything in float64 from the same (float32-cast) inputs; the edge split as specified
    (float32 attention compared with tau in float32)."""
    tp_kd = t_power(t, T, GAMMA_KD).view(-1, 1, 1, 1)
    tp_b = t_power(t, T, GAMMA_B).view(-1, 1, 1, 1)
    edge = (d.float().pow(tp_kd) > tau).double()
    body = 1.0 - edge
    s64 = s.detach().float().double().requires_grad_(True)
    te64, y64, d64 = te.float().double(), y.float().double(), d.float().double()
    a_b = d64.pow(tp_b.double())
    d2n = (s64 - y64) ** 2
    d2k = (s64 - te64) ** 2
    l2 = d2n.mean()
    bd = (a_b * d2n).mean()
    dims = (1, 2, 3)
    le = (edge * d2k).sum(dims) / (edge.sum(dims) + 1e-8)
    lb = (body * d2k).sum(dims) / (body.sum(dims) + 1e-8)
    efkd = lambda_e * le.mean() + lambda_b * lb.mean()
    total = weights[0] * l2 + weights[1] * efkd + weights[2] * bd
    total.backward()
    return total.detach(), {"l2": l2.detach(), "efkd": efkd.detach(), "boundary": bd.detach()}, s64.grad


def _dev(*xs):
    """Tensors on the test device (the same tensors on CPU)."""
    return tuple(x.to(DEVICE) for x in xs)


def _triton(s, te, y, d, t, tau, block=None, weights=(1.0, 0.25, 0.25)):
    """The Triton path on the test device; values and d total/d s back on the CPU."""
    s, te, y, d, t = _dev(s.detach().clone(), te, y, d, t)
    s.requires_grad_(True)
    total, terms = FDL.fused_distill_loss_triton(s, te, y, d, t, T, tau=tau, weights=weights, block=block)
    total.backward()
    return total.detach().cpu(), {k: v.detach().cpu() for k, v in terms.items()}, s.grad.cpu()


def _rel(a, b):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


# the largest errors seen, printed at the end of the run with `-s` (for the closing note)
MAX_ERR: dict[str, float] = {}


def _note(key, err):
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)


@pytest.fixture(scope="module", autouse=True)
def _report_max_errors():
    yield
    if MAX_ERR:
        print("\nmax relative errors:", {k: f"{v:.2e}" for k, v in sorted(MAX_ERR.items())})


# ----------------------------------------------------------------------------------------
# import and dispatch
# ----------------------------------------------------------------------------------------
def test_import_does_not_import_triton():
    code = "import sys, edgeseg.kernels as k; assert 'triton' not in sys.modules, 'triton imported'; print('ok')"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_public_api():
    for name in ("fused_distill_loss", "fused_sampler_step", "triton_available"):
        assert hasattr(K, name)
    assert K.triton_available() is True
    # the kernels' own copies of core constants agree with the core
    assert tuple(FSS.PRED_CODES) == PREDICTION_TYPES
    assert FDL._EPS_COUNT == core_losses._EPS_COUNT  # the kernels get it as `eps`


KERNELS_DIR = pathlib.Path(K.__file__).resolve().parent


def _imported_modules(tree: ast.AST, package: str):
    """Every module an `import` / `from ... import` in `tree` names, relative imports resolved
    against `package` (anywhere in the file: top level, functions, conditionals)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            for a in node.names:  # `from edgeseg import losses` names a module too
                yield f"{mod}.{a.name}"


def test_kernels_import_nothing_from_the_core():
    """The dependency runs one way: no module under kernels/ imports `edgeseg.` other than
    `edgeseg.kernels` (the core chooses the backend and passes tensors and coefficients in)."""
    files = sorted(KERNELS_DIR.rglob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "_launch.py", "fused_distill_loss.py", "fused_sampler_step.py"}
    bad = []
    for f in files:
        tree = ast.parse(f.read_text(), filename=str(f))
        package = ".".join(["edgeseg", "kernels", *f.parent.relative_to(KERNELS_DIR).parts])
        for mod in _imported_modules(tree, package):
            top = mod.split(".")
            if top[0] == "edgeseg" and mod != "edgeseg" and top[:2] != ["edgeseg", "kernels"]:
                bad.append(f"{f.name}: {mod}")
            if mod == "edgeseg":
                bad.append(f"{f.name}: import edgeseg")
    assert not bad, bad


def test_import_checker_catches_core_imports():
    """The checker itself: absolute, relative-beyond-the-package and nested imports are caught."""
    src = ("import torch\nfrom . import _launch\nfrom ._launch import cdiv\n"
           "def f():\n    from edgeseg.boundary import t_power\n"
           "from .. import losses\nimport edgeseg.diffusion\nfrom edgeseg import train\n")
    mods = set(_imported_modules(ast.parse(src), "edgeseg.kernels"))
    assert {"edgeseg.kernels._launch", "edgeseg.boundary", "edgeseg.losses", "edgeseg.diffusion",
            "edgeseg.train"} <= mods


def test_torch_reference_is_edgeseg_losses_bit_for_bit():
    """The kernels' self-contained torch reference equals `edgeseg.losses` exactly (values and
    gradients), and its t_power copy equals `edgeseg.boundary.t_power`."""
    tt = torch.arange(T + 1)
    for gamma in (GAMMA_KD, GAMMA_B, 0.3, 1.2):
        assert torch.equal(FDL.t_power(tt, T, gamma), core_t_power(tt, T, gamma))
    for dtype in (torch.float32, torch.bfloat16):
        s, te, y, d, t = _make_inputs(3, 17, 19, dtype, seed=21)
        for tau, w in ((0.6, (1.0, 0.25, 0.25)), (0.35, (0.7, 0.5, 0.9))):
            r_tot, r_terms, r_grad = _reference(s, te, y, d, t, tau, weights=w)
            a = s.detach().clone().requires_grad_(True)
            tot, terms = FDL.fused_distill_loss_torch(a, te, y, d, t, T, tau=tau, weights=w)
            tot.backward()
            assert torch.equal(tot, r_tot)
            for k, rk in (("l2", "l2"), ("efkd", "kd"), ("boundary", "boundary")):
                assert torch.equal(terms[k].detach(), r_terms[rk])
            assert torch.equal(a.grad, r_grad)


def test_auto_picks_torch_on_cpu(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the Triton path ran for CPU tensors under backend='auto'")

    monkeypatch.setattr(FDL, "fused_distill_loss_triton", boom)
    monkeypatch.setattr(FSS, "fused_sampler_step", boom)
    s, te, y, d, t = _make_inputs(2, 16, 16)
    total, terms = K.fused_distill_loss(s, te, y, d, t, T)  # backend="auto"
    ref_total, ref_terms, _ = _reference(s, te, y, d, t, 0.6)
    assert torch.equal(total, ref_total)
    assert set(terms) == {"l2", "efkd", "boundary"}
    assert torch.equal(terms["efkd"], ref_terms["kd"])
    o, x = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    for kind, k in (("ddim", 4), ("ddpm", T)):
        sch = make_scheduler(kind, k, "epsilon")
        assert sch.backend == "auto"
        assert isinstance(sch.step(o, int(sch.timesteps[0]), x), SchedulerOutput)
    with pytest.raises(AssertionError):
        K.fused_distill_loss(s, te, y, d, t, T, backend="triton")
    with pytest.raises(ValueError):
        K.fused_distill_loss(s, te, y, d, t, T, backend="cuda")


def test_auto_picks_triton_on_cuda_only(monkeypatch):
    """backend="auto" (the trainer's and the samplers' default) runs the kernels on CUDA tensors,
    and the torch reference on CPU tensors (EDGESEG_TEST_DEVICE=cuda checks the CUDA half)."""
    calls = []
    loss, step = FDL.fused_distill_loss_triton, FSS.fused_sampler_step
    monkeypatch.setattr(FDL, "fused_distill_loss_triton", lambda *a, **k: calls.append("loss") or loss(*a, **k))
    monkeypatch.setattr(FSS, "fused_sampler_step", lambda *a, **k: calls.append("step") or step(*a, **k))
    s, te, y, d, t = _dev(*_make_inputs(2, 16, 16))
    K.fused_distill_loss(s, te, y, d, t, T)
    o, x = _dev(torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8))
    for kind, k in (("ddim", 4), ("ddpm", T)):
        sch = make_scheduler(kind, k, "epsilon")
        sch.step(o, int(sch.timesteps[0]), x)
    assert calls == (["loss", "step", "step"] if DEVICE == "cuda" else [])


# ----------------------------------------------------------------------------------------
# fused distillation loss: values and gradients
# ----------------------------------------------------------------------------------------
CASES = [  # (B, H, W, block): odd sizes, ragged last blocks, many blocks per sample
    (1, 16, 16, None),
    (3, 33, 37, 256),
    (5, 20, 23, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tau", [0.3, 0.6])
@pytest.mark.parametrize("B,H,W,block", CASES, ids=[f"B{c[0]}_{c[1]}x{c[2]}_blk{c[3]}" for c in CASES])
def test_loss_values_and_grads(B, H, W, block, tau, dtype):
    s, te, y, d, t = _make_inputs(B, H, W, dtype, seed=B * 100 + H)
    if B == 1:
        t = torch.tensor([T - 1])
    tot, terms, grad = _triton(s, te, y, d, t, tau, block=block)
    r_tot, r_terms, r_grad = _reference(s, te, y, d, t, tau)
    f_tot, f_terms, f_grad = _float64(s, te, y, d, t, tau)
    tag = "fp32" if dtype == torch.float32 else "bf16"

    assert tot.dtype == torch.float32 and tot.shape == ()
    # values: the kernel computes in float32 from the same values as the reference does
    for k, rk in (("l2", "l2"), ("efkd", "kd"), ("boundary", "boundary")):
        torch.testing.assert_close(terms[k], r_terms[rk], rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(terms[k].double(), f_terms[k], rtol=2e-5, atol=1e-7)
        _note(f"value_vs_torch_{tag}", _rel(terms[k], r_terms[rk]))
        _note(f"value_vs_f64_{tag}", _rel(terms[k], f_terms[k]))
    torch.testing.assert_close(tot, r_tot, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(tot.double(), f_tot, rtol=2e-5, atol=1e-7)

    # gradients d total / d eps_s, in eps_s's dtype
    assert grad.dtype == dtype and grad.shape == s.shape
    scale = r_grad.float().abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(grad, r_grad, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(grad.double(), f_grad, rtol=1e-5, atol=1e-6 * scale)
    else:
        # The kernel rounds the fp32 gradient to bf16 once (<= half a bf16 ulp from float64;
        # under the interpreter the rounding is torch's, see FusedDistillLossFunction.backward).
        # The reference calls .float() once per term, so autograd rounds three partial
        # gradients to bf16 and sums them in bf16: a few bf16 ulps from float64.
        torch.testing.assert_close(grad.double(), f_grad, rtol=2**-8, atol=1e-6 * scale)
        torch.testing.assert_close(grad.float(), r_grad.float(), rtol=2**-5, atol=2e-3 * scale)
    _note(f"grad_vs_torch_{tag}", _rel(grad, r_grad))
    _note(f"grad_vs_f64_{tag}", _rel(grad, f_grad))


def test_fp16_noncontiguous_int_t_and_weights():
    B, H, W = 3, 19, 21
    s, te, y, d, _ = _make_inputs(B, W, H, torch.float16, seed=7)
    # non-contiguous views (H and W swapped back), a scalar int t, custom weights and gammas
    s, te, y, d = (x.transpose(2, 3) for x in (s, te, y, d))
    ds, dte, dy, dd = _dev(s, te, y, d)  # .to keeps the strides
    assert not s.is_contiguous() and not ds.is_contiguous()
    kw = dict(tau=0.45, lambda_e=3.0, lambda_b=1.5, gamma_kd=1.2, gamma_b=0.3, weights=(0.7, 0.5, 0.9))
    s1 = ds.detach().clone().requires_grad_(True)
    tot, terms = K.fused_distill_loss(s1, dte, dy, dd, 40, T, backend="triton", **kw)
    tot.backward()
    s2 = s.detach().clone().requires_grad_(True)
    r_tot, r_terms = K.fused_distill_loss(s2, te, y, d, 40, T, backend="torch", **kw)
    r_tot.backward()
    for k in terms:
        torch.testing.assert_close(terms[k].cpu(), r_terms[k], rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(tot.cpu(), r_tot, rtol=2e-5, atol=1e-7)
    assert s1.grad.dtype == torch.float16
    torch.testing.assert_close(s1.grad.float().cpu(), s2.grad.float(), rtol=2**-9,
                               atol=1e-4 * s2.grad.float().abs().max().item())


def test_grad_output_scaling_and_term_gradients():
    s, te, y, d, t = _make_inputs(3, 17, 18, seed=3)
    ds, dte, dy, dd, dt = _dev(s, te, y, d, t)
    tau = 0.6
    # 3 * total + 2 * efkd - boundary, through every output of the Function
    a = ds.detach().clone().requires_grad_(True)
    tot, terms = K.fused_distill_loss(a, dte, dy, dd, dt, T, tau=tau, backend="triton")
    (3.0 * tot + 2.0 * terms["efkd"] - terms["boundary"]).backward()
    b = s.detach().clone().requires_grad_(True)
    r_tot, r_terms = K.fused_distill_loss(b, te, y, d, t, T, tau=tau, backend="torch")
    (3.0 * r_tot + 2.0 * r_terms["efkd"] - r_terms["boundary"]).backward()
    torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-5, atol=1e-6 * b.grad.abs().max().item())
    # a single term alone
    a.grad = None
    b.grad = None
    _, terms = K.fused_distill_loss(a, dte, dy, dd, dt, T, tau=tau, backend="triton")
    terms["l2"].backward()
    _, r_terms = K.fused_distill_loss(b, te, y, d, t, T, tau=tau, backend="torch")
    r_terms["l2"].backward()
    torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-5, atol=1e-7)
    # teacher, target and map take no gradient
    te2 = dte.clone().requires_grad_(True)
    y2 = dy.clone().requires_grad_(True)
    c = ds.detach().clone().requires_grad_(True)
    tot, _ = K.fused_distill_loss(c, te2, y2, dd, dt, T, backend="triton")
    tot.backward()
    assert te2.grad is None and y2.grad is None and c.grad is not None


def test_empty_regions_and_t_extremes():
    """All body (d = 0: A = 0 <= tau), all edge (the 1% rule's all-ones map), t = T (0 ** 0 = 1)."""
    B, H, W = 4, 16, 16
    s, te, y, _, _ = _make_inputs(B, H, W, seed=11)
    d = torch.zeros(B, 1, H, W)
    d[1] = 1.0  # all edge
    d[2, :, ::2] = 1.0  # half edge (rows of ones), half exact zeros
    d[3, :, :, :5] = 0.5  # a column band at 0.5
    for t in (torch.tensor([0, T - 1, T, 5]), torch.tensor([T, T, T - 1, 0]), torch.tensor([T - 1, 0, 0, T])):
        for tau in (0.3, 0.6):
            tot, terms, grad = _triton(s, te, y, d, t, tau, block=64)
            r_tot, r_terms, r_grad = _reference(s, te, y, d, t, tau)
            torch.testing.assert_close(terms["efkd"], r_terms["kd"], rtol=2e-5, atol=1e-7)
            torch.testing.assert_close(terms["boundary"], r_terms["boundary"], rtol=2e-5, atol=1e-7)
            torch.testing.assert_close(tot, r_tot, rtol=2e-5, atol=1e-7)
            torch.testing.assert_close(grad, r_grad, rtol=1e-5, atol=1e-6 * r_grad.abs().max().item())
    with pytest.raises(ValueError):  # checked for CPU tensors only (on CUDA it would cost a host sync)
        K.fused_distill_loss(s, te, y, d, torch.tensor([0, 1, 2, T + 1]), T, backend="triton")


def test_golden_vectors_through_triton(golden):
    """The paper authors' vectors (8 x 128 x 128, all samples) through backend="triton"."""
    g = golden
    s = torch.from_numpy(g["eps_student"])
    te = torch.from_numpy(g["eps_teacher"])
    y = torch.from_numpy(g["noise"])
    d = torch.from_numpy(g["dist_norm"])
    t = torch.from_numpy(g["t"])
    Tg = int(g["T"])
    assert Tg == T
    ds, dte, dy, dd, dt = _dev(s, te, y, d, t)
    for i, tau in enumerate(g["edge_thresholds"].tolist()):
        a = ds.clone().requires_grad_(True)
        tot, terms = K.fused_distill_loss(a, dte, dy, dd, dt, Tg, tau=tau, backend="triton")
        counts = tot.grad_fn.saved_tensors[-1].clone().cpu()  # the kernel's per-sample edge counts
        tot.backward()
        np.testing.assert_allclose(terms["l2"].item(), g["l2_loss"], rtol=1e-5)
        np.testing.assert_allclose(terms["boundary"].item(), g["boundary_loss"], rtol=1e-5)
        np.testing.assert_allclose(terms["efkd"].item(), g["efkd_loss"][i], rtol=1e-5)
        np.testing.assert_allclose(tot.item(), g["total_loss"][i], rtol=1e-5)
        for k, ref in (("l2", g["l2_loss"]), ("boundary", g["boundary_loss"]), ("efkd", g["efkd_loss"][i]),
                       ("total", g["total_loss"][i])):
            v = tot if k == "total" else terms[k]
            _note("golden_scalar", abs(v.item() - float(ref)) / abs(float(ref)))
        # the edge split (exact)
        np.testing.assert_array_equal(counts.numpy().astype(np.int64), g["efkd_edge_count"][i])
        # gradient vs the torch reference on the same vectors
        r_tot, r_terms, r_grad = _reference(s, te, y, d, t, tau)
        torch.testing.assert_close(a.grad.cpu(), r_grad, rtol=1e-5, atol=1e-6 * r_grad.abs().max().item())
        _note("golden_grad_vs_torch", _rel(a.grad.cpu(), r_grad))


# ----------------------------------------------------------------------------------------
# fused sampler step
# ----------------------------------------------------------------------------------------
def _step_pair(kind, pred, k, eta=0.0):
    fused = make_scheduler(kind, k, pred, backend="triton", eta=eta)
    ref = DDPMScheduler(prediction_type=pred) if kind == "ddpm" else DDIMScheduler(prediction_type=pred, eta=eta)
    ref.set_timesteps(k)
    return fused, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pred", PREDICTION_TYPES)
@pytest.mark.parametrize("kind,k,eta", [("ddim", 1, 0.0), ("ddim", 7, 0.0), ("ddim", 7, 0.6), ("ddpm", T, 0.0)])
def test_sampler_step_matches_torch(kind, k, eta, pred, dtype):
    fused, ref = _step_pair(kind, pred, k, eta)
    assert isinstance(fused, FusedDDPMScheduler if kind == "ddpm" else FusedDDIMScheduler)
    assert fused.timesteps.tolist() == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(5)
    ts = fused.timesteps.tolist()
    for t in sorted({ts[0], ts[len(ts) // 2], ts[-1]}):
        # large outputs so that the x0 clip to [-1, 1] is active on part of the map
        o = (torch.randn((3, 1, 13, 29), generator=g) * 3).to(dtype)
        x = (torch.randn((3, 1, 13, 29), generator=g) * 2).to(dtype)
        z = torch.randn((3, 1, 13, 29), generator=g).to(dtype)
        do, dx, dz = _dev(o, x, z)
        ra, rb = fused.step(do, t, dx, noise=dz), ref.step(o, t, x, noise=z)
        assert isinstance(ra, SchedulerOutput) and isinstance(rb, SchedulerOutput)
        pairs = ((ra.prev_sample.cpu(), rb.prev_sample), (ra.pred_original_sample.cpu(), rb.pred_original_sample))
        for i, (a, b) in enumerate(pairs):
            assert a.dtype == b.dtype and a.shape == b.shape
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
                _note("sampler_fp32_abs", (a - b).abs().max().item())
            elif i == 0:
                # the torch step rounds to bf16 at every operation, the kernel only once
                torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)
                _note("sampler_bf16_abs", (a.float() - b.float()).abs().max().item())
        if dtype != torch.float32:
            # the kernel computes in fp32 and rounds once: within a bf16 ulp of the fp32 torch step
            # (the bf16 torch x0 is not a fair reference: epsilon divides bf16 rounding by sqrt(abar_t))
            r32 = ref.step(o.float(), t, x.float(), noise=z.float())
            for a, b in ((ra.prev_sample, r32.prev_sample), (ra.pred_original_sample, r32.pred_original_sample)):
                torch.testing.assert_close(a.cpu().float(), b, rtol=2**-7, atol=1e-5)


def test_fused_sampler_step_op_without_x0():
    """The op alone: tensors and coefficients in, (prev_sample, None) out with return_x0=False."""
    o, x = _dev(torch.randn(2, 1, 5, 7), torch.randn(2, 1, 5, 7))
    prev, x0 = K.fused_sampler_step(o, x, "epsilon", "ddim", 0.5, 0.8660254, 0.7, 0.7141428)
    prev2, none = K.fused_sampler_step(o, x, "epsilon", "ddim", 0.5, 0.8660254, 0.7, 0.7141428, return_x0=False)
    assert none is None and torch.equal(prev, prev2)
    torch.testing.assert_close(x0.cpu(), ((x.cpu() - 0.8660254 * o.cpu()) / 0.5).clamp(-1, 1))
    with pytest.raises(ValueError):
        K.fused_sampler_step(o, x, "x0", "ddim", 1, 1, 1, 1)
    with pytest.raises(ValueError):
        K.fused_sampler_step(o, x, "epsilon", "euler", 1, 1, 1, 1)


@pytest.mark.parametrize("kind,k,eta", [("ddpm", T, 0.0), ("ddim", 6, 0.8)])
def test_generator_draws_and_sample_masks(kind, k, eta):
    """Seeded generator: same noise draw as the torch step (DDPM, DDIM eta > 0); whole fused
    sampling chains equal the torch ones."""
    fused, ref = _step_pair(kind, "epsilon", k, eta)
    t = 100 if kind == "ddpm" else int(fused.timesteps[1])
    o, x = _dev(torch.randn(2, 1, 9, 11), torch.randn(2, 1, 9, 11))  # one generator device for both
    a = fused.step(o, t, x, generator=torch.Generator(DEVICE).manual_seed(1)).prev_sample
    b = ref.step(o, t, x, generator=torch.Generator(DEVICE).manual_seed(1)).prev_sample
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    def model(x, g, t):  # a deterministic stand-in for the network
        return 0.5 * x + 0.1 * g.mean(1, keepdim=True) + 0.001 * t.view(-1, 1, 1, 1).float()

    img = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(6, 1, 12, 10, generator=torch.Generator().manual_seed(3))
    if kind == "ddpm":
        return  # (all T steps under the interpreter: covered step by step above)
    for pred in PREDICTION_TYPES:
        for e in (0.0, eta):
            fused, ref = _step_pair("ddim", pred, k, e)
            m1, s1 = sample_masks(model, *_dev(img), fused, ensemble=3, noise=_dev(noise)[0],
                                  generator=torch.Generator(DEVICE).manual_seed(4))
            m2, s2 = sample_masks(model, *_dev(img), ref, ensemble=3, noise=_dev(noise)[0],
                                  generator=torch.Generator(DEVICE).manual_seed(4))
            torch.testing.assert_close(m1.cpu(), m2.cpu(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s1.cpu(), s2.cpu(), rtol=1e-5, atol=1e-5)


def test_make_scheduler_errors():
    with pytest.raises(ValueError):
        make_scheduler("euler", 4, "epsilon")
    with pytest.raises(ValueError):
        make_scheduler("ddpm", 10, "epsilon")  # the ancestral sampler runs all T steps
    with pytest.raises(ValueError):
        make_scheduler("ddim", 4, "x0")
    with pytest.raises(ValueError):
        make_scheduler("ddim", 4, "epsilon", backend="cuda")
    with pytest.raises(ValueError):
        make_scheduler("ddpm", T, "epsilon", eta=0.5)  # eta is DDIM's
    with pytest.raises(ValueError):
        make_scheduler("ddim", 4, "epsilon", eta=-1.0)


# ----------------------------------------------------------------------------------------
# the GPU path compiles (no GPU needed: Triton's CUDA backend compiles to PTX/cubin on CPU)
# ----------------------------------------------------------------------------------------
def _cuda_backend_usable() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:
        return False


def _raw(fn):
    """The plain Python function behind a (possibly interpreted) Triton kernel."""
    from triton.runtime.jit import JITFunction

    return JITFunction(getattr(fn, "fn", fn)) if not isinstance(fn, JITFunction) else fn


@pytest.mark.skipif(not _cuda_backend_usable(), reason="Triton's CUDA backend is not installed")
def test_kernels_compile_for_sm90():
    """Every kernel specialisation the wrappers launch compiles for sm_90 (PTX and cubin).

    Runs in a subprocess with the interpreter off: the interpreter patches triton.language."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_kernels; test_kernels._compile_all(); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def _compile_all():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    fwd, fin, bwd = FDL._kernels()
    samp = FSS._kernel()

    def compile_(fn, sig, consts, **opts):
        k = triton.compile(ASTSource(fn=_raw(fn), signature=sig, constexprs=consts), target=target,
                           options={"num_warps": 4, **opts})
        assert k.asm.get("ptx") and k.asm.get("cubin")
        return k

    maps = ("s_ptr", "te_ptr", "y_ptr")
    for dt in ("fp32", "bf16", "fp16"):
        sig = {**{m: f"*{dt}" for m in maps}, "d_ptr": "*fp32", "t_ptr": "*i64", "tp_kd_ptr": "*fp32",
               "tp_b_ptr": "*fp32", "part_ptr": "*fp32", "N": "i32", "NBLK": "i32", "T": "i32", "tau": "fp32",
               "BLOCK": "constexpr"}
        compile_(fwd, sig, {"BLOCK": 1024})
        sig = {**{m: f"*{dt}" for m in maps}, "d_ptr": "*fp32", "t_ptr": "*i64", "tp_kd_ptr": "*fp32",
               "tp_b_ptr": "*fp32", "cnt_ptr": "*fp32", "g_tot_ptr": "*fp32", "g_l2_ptr": "*fp32",
               "g_kd_ptr": "*fp32", "g_bd_ptr": "*fp32", "grad_ptr": f"*{dt}", "N": "i32", "T": "i32",
               **{k: "fp32" for k in ("n_f", "tau", "inv_bn", "inv_b", "lambda_e", "lambda_b", "w0", "w1", "w2", "eps")},
               "HAS_G_TOT": "constexpr", "HAS_G_L2": "constexpr", "HAS_G_KD": "constexpr", "HAS_G_BD": "constexpr",
               "BLOCK": "constexpr"}
        for flags in ((True, False, False, False), (False, True, True, True)):
            compile_(bwd, sig, {**dict(zip(("HAS_G_TOT", "HAS_G_L2", "HAS_G_KD", "HAS_G_BD"), flags)), "BLOCK": 1024})
    sig = {"part_ptr": "*fp32", "cnt_ptr": "*fp32", "out_ptr": "*fp32", "B": "i32", "NBLK": "i32",
           **{k: "fp32" for k in ("n_f", "bn_f", "b_f", "lambda_e", "lambda_b", "w0", "w1", "w2", "eps")},
           "BLOCK_B": "constexpr", "BLOCK_K": "constexpr"}
    compile_(fin, sig, {"BLOCK_B": 64, "BLOCK_K": 16})
    for pred in range(3):
        for mode in range(2):
            for has_noise in (False, True):
                sig = {"out_ptr": "*fp32", "x_ptr": "*fp32", "noise_ptr": "*fp32", "y_ptr": "*fp32",
                       "x0_ptr": "*fp32", "n": "i32", **{k: "fp32" for k in ("sa", "s1", "c_x0", "c_b", "std")},
                       "PRED": "constexpr", "MODE": "constexpr", "HAS_NOISE": "constexpr", "WRITE_X0": "constexpr",
                       "BLOCK": "constexpr"}
                compile_(samp, sig, {"PRED": pred, "MODE": mode, "HAS_NOISE": has_noise, "WRITE_X0": True,
                                     "BLOCK": 1024}, enable_fp_fusion=False)
