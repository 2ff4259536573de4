"""bf16 autocast in training on the CPU: applied where the CPU has native bf16, off otherwise,
recorded with the weights; parameters, optimizer state and checkpoints stay fp32."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from micro import MICRO_STUDENT, micro_datasets, micro_environment, micro_teacher
from edgeseg.train import TrainConfig, Trainer, bf16_supported

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def micro_env(tmp_path_factory):
    yield from micro_environment(tmp_path_factory.getbasetemp())


def _trainer(tmp_path, bf16: bool) -> Trainer:
    data = micro_datasets(16, 4)
    cfg = TrainConfig(role="student", preset=MICRO_STUDENT, kd="efkd", batch_size=8, epochs=1, lr=1e-3,
                      num_workers=0, seed=0, bf16=bf16, ema_start=1)
    return Trainer(cfg, tmp_path, teacher=micro_teacher(), train_ds=data[0], val_ds=data[1], device=CPU, quiet=True)


def _conv_dtypes(tr: Trainer) -> list[torch.dtype]:
    """The dtypes the student's convolutions compute in during one training step."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for m in tr.model.modules() if isinstance(m, torch.nn.Conv2d)]
    batch = next(iter(tr._loader(0)))
    try:
        tr.train_step(batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_bf16_autocast_runs_the_convolutions_in_bf16_where_the_cpu_supports_it(tmp_path):
    on, off = _trainer(tmp_path / "on", True), _trainer(tmp_path / "off", False)
    assert on.bf16 == bf16_supported(CPU) and off.bf16 is False
    assert set(_conv_dtypes(off)) == {torch.float32}
    expect = torch.bfloat16 if bf16_supported(CPU) else torch.float32
    assert expect in set(_conv_dtypes(on))
    # what is stored stays fp32: weights, EMA, optimizer state
    assert all(p.dtype == torch.float32 for p in on.model.parameters())
    assert all(p.dtype == torch.float32 for p in on.ema.model.parameters())
    assert all(v.dtype == torch.float32 for st in on.opt.state.values() for v in st.values() if v.is_floating_point())


def test_the_checkpoint_records_whether_bf16_autocast_ran(tmp_path):
    tr = _trainer(tmp_path, True)
    tr.fit()
    meta = json.loads(tr.save_final().with_suffix(".json").read_text())
    assert meta["bf16_autocast"] is bf16_supported(CPU)
    assert meta["train_config"]["bf16"] is True


def test_bf16_bench_child_times_a_training_step():
    code = ("import sys; sys.path.insert(0, %r); import micro; micro.register_micro(); "
            "sys.path.insert(0, %r); import bench.bf16 as b; "
            "r = b.child(micro.MICRO_STUDENT, True, 1, 1, 4); print(r['bf16'], r['s_per_step'] > 0)"
            % (str(REPO / "tests"), str(REPO)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == [str(bf16_supported(CPU)), "True"]
