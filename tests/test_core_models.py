"""edgeseg.models: the preset registry, Table II parameter counts, FLOPs per call, forward shapes,
and the depth-cut student design. Run with `pytest -s` to see the counts."""
from __future__ import annotations

import pytest
import torch

from edgeseg.errors import EdgesegError
from edgeseg.models import PRESETS, DermoSegDiff, Preset, build, count_params, flops_per_call, list_presets, preset

# Paper Table II (millions of parameters)
TABLE_II = {
    "teacher-isic2018": 81.6,
    "student5-isic2018": 39.9,
    "student4-isic2018": 19.9,
    "student-isic2018": 9.3,
    "teacher-ham10000": 40.3,
    "student5-ham10000": 20.3,
    "student4-ham10000": 12.6,
    "student-ham10000": 8.5,
}
STAGES = {"teacher": 6, "student5": 5, "student4": 4, "student": 3}



# ----------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------
def test_registry_names():
    names = list_presets()
    for required in (*TABLE_II, "tiny-teacher", "tiny-student", "student-mobile"):
        assert required in names
        assert PRESETS[required].name == required
        assert isinstance(preset(required), Preset)
    assert len(set(names)) == len(names)


def test_unknown_preset_raises_listing_names():
    with pytest.raises(EdgesegError) as ei:
        build("teacher-isic2019")
    msg = str(ei.value)
    assert "teacher-isic2019" in msg
    for n in list_presets():
        assert n in msg
    with pytest.raises(EdgesegError):
        preset("nope")


def test_preset_fields():
    for n in TABLE_II:
        p = preset(n)
        assert p.prediction_type == "epsilon"  # the paper's
        assert p.image_size == 128 and (p.heads, p.dim_head) == (4, 32)
        assert p.stages == STAGES[n.split("-")[0]]
        assert p.role == ("teacher" if n.startswith("teacher") else "student")
    for n in ("tiny-teacher", "tiny-student"):
        assert preset(n).prediction_type in ("epsilon", "sample", "v_prediction")
    assert preset("tiny-student").teacher == "tiny-teacher"
    assert preset("student-mobile").teacher == "teacher-isic2018"
    assert preset("student-mobile").image_size == 128


def test_preset_dict_round_trip_and_overrides():
    for n in list_presets():
        p = preset(n)
        assert Preset.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError):
        Preset.from_dict({**preset("tiny-student").to_dict(), "bogus": 1})
    m = build("tiny-student", prediction_type="v_prediction")
    assert m.preset.prediction_type == "v_prediction" and m.preset.name == "tiny-student"
    with pytest.raises(ValueError):
        DermoSegDiff(Preset("bad", 16, 8, (1, 2), (1, 2, 4), 4))
    with pytest.raises(ValueError, match="blocks must be one of paper, mobile"):
        Preset.from_dict({**preset("tiny-student").to_dict(), "blocks": "fast"})
    # a checkpoint written before `blocks` existed rebuilds the paper network
    old = {k: v for k, v in preset("tiny-student").to_dict().items() if k != "blocks"}
    assert Preset.from_dict(old).blocks == "paper"
    # checkpoints written while low_res_attention existed carry it at 0: read as before; another value
    # is refused, naming the commit that builds such a network
    mobile = preset("tiny-student-mobile").to_dict()
    assert Preset.from_dict({**mobile, "low_res_attention": 0}) == preset("tiny-student-mobile")
    with pytest.raises(ValueError, match="low_res_attention = 1 .*commit 3a06f44"):
        Preset.from_dict({**mobile, "low_res_attention": 1})


def test_mobile_blocks_keep_attention_in_the_bottleneck_only():
    m = build("tiny-student-mobile")
    assert all(isinstance(s.attn_x, torch.nn.Identity) and isinstance(s.attn_g, torch.nn.Identity) for s in m.downs)
    assert all(isinstance(s.attn, torch.nn.Identity) for s in m.ups)
    from edgeseg.models import LinearAttention

    assert sum(isinstance(x, LinearAttention) for x in m.modules()) == 1
    paper = build("tiny-student")
    assert all(not isinstance(s.attn, torch.nn.Identity) for s in paper.ups)


# ----------------------------------------------------------------------------------------
# Table II
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TABLE_II))
def test_table_ii_parameter_counts(name):
    n = count_params(build(name)) / 1e6
    paper = TABLE_II[name]
    print(f"[params] {name:20s} {n:7.3f} M (paper {paper} M, {100 * (n - paper) / paper:+.2f}%)")
    assert abs(n - paper) <= 0.01 * paper, f"{name}: {n:.3f} M vs paper {paper} M"


def test_students_are_depth_cuts_of_their_teacher():
    for ds in ("isic2018", "ham10000"):
        teacher_p = preset(f"teacher-{ds}")
        with torch.device("meta"):  # shapes only, no memory
            teacher = build(teacher_p)
        tshapes = {k: v.shape for k, v in teacher.state_dict().items()}
        for prefix in ("student5", "student4", "student"):
            p = preset(f"{prefix}-{ds}")
            k = p.stages
            assert p.teacher == teacher_p.name
            assert (p.dim_x, p.dim_g) == (teacher_p.dim_x, teacher_p.dim_g)
            assert p.dim_x_mults == teacher_p.dim_x_mults[:k] and p.dim_g_mults == teacher_p.dim_g_mults[:k]
            with torch.device("meta"):
                s = build(p)
            assert len(s.downs) == k and len(s.ups) == k
            # every encoder stage but the last (which trades its downsample for a 3x3 conv) and
            # the stems have the teacher's exact tensor shapes: the same first-stage widths
            shared = [
                key for key in s.state_dict()
                if key.startswith(("time_x.", "time_g.", "init_x.", "init_g."))
                or any(key.startswith(f"downs.{i}.") for i in range(k - 1))
            ]
            assert shared
            for key in shared:
                assert s.state_dict()[key].shape == tshapes[key], key
            assert count_params(s) < count_params(teacher)


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-teacher", "tiny-student", "tiny-student-mobile"])
def test_tiny_forward_shapes(name):
    torch.manual_seed(0)
    m = build(name).eval()
    s = preset(name).image_size
    x, g, t = torch.randn(2, 1, s, s), torch.rand(2, 3, s, s), torch.tensor([0, 249])
    with torch.no_grad():
        out = m(x, g, t)
    assert out.shape == (2, 1, s, s) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # the time step matters, the batch entries are independent
    with torch.no_grad():
        one = m(x[:1], g[:1], t[:1])
    torch.testing.assert_close(one, out[:1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out[0], m(x[:1], g[:1], torch.tensor([100]))[0])


@pytest.mark.parametrize("name", ["tiny-student", "tiny-student-mobile"])
def test_tiny_backward_reaches_every_parameter(name):
    m = build(name)
    s = preset(name).image_size
    out = m(torch.randn(1, 1, s, s), torch.rand(1, 3, s, s), torch.tensor([7]))
    out.square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing


# ----------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------
def test_student_mobile_flops_measured_on_cpu():
    flops, shape = flops_per_call("student-mobile", device="cpu")
    print(f"[flops] student-mobile (CPU run) {flops / 1e9:.3f} GFLOP per call at 128x128")
    assert shape == (1, 1, 128, 128)
    assert flops <= 5e9
    assert flops_per_call("student-mobile", device="meta")[0] == flops  # meta counts are exact


def test_flops_every_preset():
    rows = {}
    for n in list_presets():
        flops, shape = flops_per_call(n)
        s = preset(n).image_size
        assert shape == (1, 1, s, s)
        rows[n] = flops / 1e9
        print(f"[flops] {n:20s} {rows[n]:8.2f} GFLOP per call at {s}x{s}")
    assert rows["student-mobile"] <= 5.0
    # mobile blocks drop the stages' attention: less work than the paper blocks at the same widths
    assert rows["tiny-student-mobile"] < rows["tiny-student"]
    # the depth cut keeps nearly all the work (2 FLOPs per MAC)
    assert rows["teacher-isic2018"] == pytest.approx(56.1, rel=0.01)
    assert rows["student-isic2018"] == pytest.approx(53.7, rel=0.01)
    assert rows["tiny-student"] < 2.0 and rows["tiny-teacher"] < 2.0
