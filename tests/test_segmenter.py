"""edgeseg.Segmenter (the one inference path for photos), the image reader and `edgeseg segment`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import edgeseg
from edgeseg.errors import CheckpointError, EdgesegError, ImageReadError
from edgeseg.imageio import read_rgb
from edgeseg.segmenter import Segmentation, Segmenter, clean_mask, postprocess

SYNTH = "tiny-student-synthetic"


@pytest.fixture(scope="module")
def seg():
    torch.set_num_threads(1)
    return Segmenter.from_pretrained(SYNTH, steps=1, ensemble=1)


def _lesion_photo(h: int, w: int) -> np.ndarray:
    """Skin-coloured background with a dark elliptical lesion in the middle."""
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (h * 0.3)) ** 2 + ((xx - w / 2) / (w * 0.25)) ** 2 < 1
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (205, 160, 140)
    img[inside] = (90, 55, 40)
    return img


def test_public_api_is_lazy_and_three_lines():
    code = "import sys, edgeseg; assert 'torch' not in sys.modules; print(edgeseg.Segmenter.__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "Segmenter", r.stderr


def test_segment_array_pil_and_path_agree_at_input_size(seg, tmp_path):
    rgb = _lesion_photo(150, 211)
    path = tmp_path / "lesion.png"
    Image.fromarray(rgb).save(path)
    outs = [seg.segment(rgb), seg.segment(Image.fromarray(rgb)), seg.segment(path), seg.segment(str(path))]
    for out in outs:
        assert isinstance(out, Segmentation)
        assert out.mask.shape == out.probability.shape == out.uncertainty.shape == (150, 211)
        assert out.mask.dtype == bool and out.probability.dtype == np.float32
        assert 0 <= out.probability.min() and out.probability.max() <= 1
        np.testing.assert_array_equal(out.mask, clean_mask(out.probability > 0.5))
        assert 0 <= out.uncertainty.min() and out.uncertainty.max() <= 1
        np.testing.assert_allclose(out.uncertainty, 1 - np.abs(2 * out.probability - 1), atol=1e-6)
        np.testing.assert_array_equal(out.mask, outs[0].mask)  # same seed, same input: same answer
    # the dark ellipse is found: the centre is lesion, the corners are not
    assert outs[0].mask[75, 105] and not outs[0].mask[:10, :10].any()


def test_large_photo_mask_is_smooth_not_a_staircase(seg):
    """Upsample the soft prediction, then threshold: the outline is not made of 64-px blocks."""
    out = seg.segment(_lesion_photo(512, 512))  # 8x the model's 64 px
    blocks = out.mask.reshape(64, 8, 64, 8).transpose(0, 2, 1, 3).reshape(64, 64, 64)
    mixed = ((blocks.sum(-1) > 0) & (blocks.sum(-1) < 64)).sum()
    assert mixed > 10, "nearest-neighbour upsampling would give 0 mixed 8x8 blocks"


def test_sources_run_folder_checkpoint_and_errors(tmp_path):
    from edgeseg.runs import shipped_path

    run = tmp_path / "run"
    run.mkdir()
    for suffix in (".safetensors", ".json"):
        (run / f"student{suffix}").write_bytes(shipped_path(SYNTH).with_suffix(suffix).read_bytes())
    a = Segmenter.from_pretrained(run, steps=1, ensemble=1)
    b = Segmenter.from_pretrained(run / "student.safetensors", steps=1, ensemble=1)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(a.predict(x)[0], b.predict(x)[0])
    assert (a.steps, a.ensemble, a.image_size) == (1, 1, 64)
    with pytest.raises(CheckpointError, match="shipped: tiny-student-128-isic2017, tiny-teacher-128-isic2017, "
                                              "tiny-student-isic2017"):
        Segmenter.from_pretrained("no-such-model")
    with pytest.raises(EdgesegError, match="steps must be a whole number"):
        Segmenter.from_pretrained(SYNTH, steps=0)
    with pytest.raises(EdgesegError, match="H x W x 3 uint8"):
        a.segment(np.zeros((10, 10), np.float32))


def test_default_is_the_shipped_real_lesion_student():
    seg = edgeseg.Segmenter.from_pretrained()
    assert seg.source == "tiny-student-128-isic2017"
    assert (seg.steps, seg.ensemble, seg.image_size) == (1, 3, 128)  # the defaults table for x0 students


# ---------------- one image reader ----------------
def test_reader_16bit_scaled_truncated_and_fifo(tmp_path):
    g16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    rgb = read_rgb(tmp_path / "g16.png")
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert rgb.min() == 0 and 250 <= rgb.max() <= 255 and len(np.unique(rgb)) > 200  # scaled, not clipped
    Image.fromarray(_lesion_photo(64, 64)).save(tmp_path / "t.jpg")
    (tmp_path / "t.jpg").write_bytes((tmp_path / "t.jpg").read_bytes()[:400])
    with pytest.raises(ImageReadError, match="t.jpg: truncated"):
        read_rgb(tmp_path / "t.jpg")
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageReadError, match="pipe.png: the image is not a regular file"):
        read_rgb(tmp_path / "pipe.png")


# ---------------- the CLI ----------------
def _cli(*args, cwd: Path):
    return subprocess.run([sys.executable, "-m", "edgeseg.cli.main", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_segment_same_stems_bad_image_and_unwritable_out(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(_lesion_photo(96, 120)).save(tmp_path / "a" / "x.png")
    Image.fromarray(_lesion_photo(200, 150)).save(tmp_path / "b" / "x.jpg", quality=90)
    r = _cli("segment", "a/x.png", "b/x.jpg", "--checkpoint", SYNTH, "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(f"{s}_{k}.png" for s in ("a_x_png", "b_x_jpg") for k in ("mask", "overlay", "uncertainty"))
    assert Image.open(tmp_path / "out" / "b_x_jpg_mask.png").size == (150, 200)  # the photo's own size

    # a truncated JPEG: one line naming it, exit 2, nothing written
    good = (tmp_path / "b" / "x.jpg").read_bytes()
    (tmp_path / "bad.jpg").write_bytes(good[: len(good) // 3])
    r = _cli("segment", "bad.jpg", "--checkpoint", SYNTH, "--out", "out2", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: bad.jpg: truncated")
    assert not any((tmp_path / "out2").glob("*")) if (tmp_path / "out2").exists() else True

    # an output that cannot be written: exit 2 naming it, not a silent success
    (tmp_path / "out3").mkdir()
    (tmp_path / "out3" / "x_mask.png").mkdir()  # a folder where the mask file must go
    r = _cli("segment", "a/x.png", "--checkpoint", SYNTH, "--out", "out3", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "x_mask.png" in last and "cannot write" in last


def test_predict_is_evaluate_and_the_exported_core(seg):
    """One sampling loop: Segmenter.predict, edgeseg.evaluate.predict and the module export traces
    give the same numbers for the same noise; DDPM and DDIM eta > 0 run through it too."""
    from edgeseg.diffusion import SamplerCore
    from edgeseg.evaluate import SamplerSettings, predict

    torch.manual_seed(0)
    x = torch.rand(2, 3, seg.image_size, seg.image_size)
    s = Segmenter.from_model(seg.core.net, steps=2, ensemble=3)
    assert isinstance(s.core, SamplerCore) and s.core.timesteps == [249, 124]
    noise = torch.randn(6, 1, seg.image_size, seg.image_size)
    a = s.predict(x, noise=noise)
    b = s.core(x, noise)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    m1, _ = predict(seg.core.net, x, SamplerSettings("ddim", 2, 3), generator=torch.Generator().manual_seed(4))
    m2, _ = s.predict(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(m1, m2)
    # eta > 0 draws from the generator: reproducible, and different from eta = 0
    e = Segmenter.from_model(seg.core.net, steps=2, ensemble=1, eta=1.0)
    r1 = e.predict(x, generator=torch.Generator().manual_seed(1))[0]
    r2 = e.predict(x, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(r1, r2) and "eta 1" in repr(e)
    with pytest.raises(EdgesegError, match="noise must be 6 x 1"):
        s.predict(x, noise=noise[:3])
    with pytest.raises(EdgesegError, match="eta"):
        Segmenter.from_model(seg.core.net, sampler="ddpm", eta=0.5)


def test_noise_schedule_travels_with_the_checkpoint(tmp_path):
    """The schedule is saved beside the weights and restored, and the Segmenter samples with it."""
    import json

    from edgeseg.checkpoint import load_model, save_model
    from edgeseg.diffusion import NoiseSchedule
    from edgeseg.models import build

    m = build("tiny-student")
    m.noise_schedule = NoiseSchedule(100, 1e-4, 0.05)
    path = save_model(m, tmp_path / "s.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["noise_schedule"] == {"kind": "linear", "num_train_timesteps": 100, "beta_start": 1e-4,
                                      "beta_end": 0.05}
    loaded = load_model(path)
    assert loaded.noise_schedule == NoiseSchedule(100, 1e-4, 0.05)
    assert Segmenter.from_model(loaded, steps=2, ensemble=1).core.timesteps == [99, 49]
    meta["noise_schedule"]["beta_end"] = 2.0
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="bad noise_schedule"):
        load_model(path)


def test_clean_mask_keeps_the_largest_lesion_with_its_holes_filled():
    m = np.zeros((40, 60), dtype=bool)
    m[5:30, 5:35] = True           # the lesion
    m[12:16, 12:16] = False        # a hole in it (a glare spot read as skin)
    m[35:38, 50:55] = True         # a speck of hair read as lesion
    m[2:4, 50:52] = True           # another speck
    out = clean_mask(m, "largest-filled")
    expect = np.zeros_like(m)
    expect[5:30, 5:35] = True
    np.testing.assert_array_equal(out, expect)
    np.testing.assert_array_equal(clean_mask(m, "none"), m)
    assert not clean_mask(np.zeros((5, 5), dtype=bool)).any()  # no lesion stays no lesion
    with pytest.raises(EdgesegError, match="unknown mask cleanup 'biggest'"):
        clean_mask(m, "biggest")


def test_postprocess_cleans_the_mask_but_not_the_probability():
    mean = -np.ones((32, 32), dtype=np.float32)
    mean[8:24, 8:24] = 1.0
    mean[14:18, 14:18] = -1.0      # hole
    mean[0:2, 28:30] = 1.0         # speck
    out = postprocess(mean, (64, 64), cleanup="largest-filled")
    assert out.mask[32, 32] and not out.mask[0:4, 56:60].any()
    assert out.probability[32, 32] < 0.5 and out.probability[1, 58] > 0.5  # the model's own map
    raw = postprocess(mean, (64, 64), cleanup="none")
    np.testing.assert_array_equal(raw.mask, raw.probability > 0.5)


def test_evaluate_batches_by_device_and_size_and_scores_as_one_batch(seg):
    """On a CPU evaluate() keeps each sampler call cache-sized (128 px, N = 3: 2 images; 64 px: 8);
    at DDIM eta 0 its scores do not depend on the batch size (the same noise per image)."""
    from edgeseg.data import SegDataset
    from edgeseg.evaluate import SamplerSettings, eval_batch_size, evaluate

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert eval_batch_size(cpu, 128, 3) == 2 and eval_batch_size(cpu, 64, 3) == 8
    assert eval_batch_size(cpu, 128, 1) == 6 and eval_batch_size(cpu, 512, 9) == 1
    assert eval_batch_size(cuda, 128, 3) == 32
    size = seg.image_size
    images = np.stack([_lesion_photo(size, size)] * 5)
    images[1:] = (images[1:] * np.linspace(0.7, 1.0, 4)[:, None, None, None]).astype(np.uint8)
    masks = np.stack([np.asarray(Image.fromarray(im).convert("L")) < 100 for im in images]).astype(np.uint8)
    ds = SegDataset(images, masks, [f"i{i}" for i in range(5)], "test", "test")
    st = SamplerSettings("ddim", 1, 3)
    auto = evaluate(seg.core.net, ds, st, keep=0, progress=False, per_image=True)  # 64 px: one batch of 5
    pairs = evaluate(seg.core.net, ds, st, batch_size=2, keep=0, progress=False, per_image=True)
    assert np.allclose(pairs["per_image"]["dsc"], auto["per_image"]["dsc"], atol=1e-3)
