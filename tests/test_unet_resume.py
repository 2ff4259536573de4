"""The U-Net baseline's resumable training (edgeseg.baselines.train_unet with state_path): a run
stopped part way and continued ends with the weights of an uninterrupted run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeseg import baselines


class _Tiny:
    """Six 32 x 32 images with a square lesion each: what train_unet reads (images, masks)."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
        self.masks = np.zeros((6, 32, 32), dtype=np.uint8)
        for i in range(6):
            self.masks[i, 4 + i:20 + i, 6:22] = 1


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_an_interrupted_unet_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    ds, kw = _Tiny(), dict(minutes=None, steps=6, batch_size=4, threads=1, channels=(8, 8, 8, 8, 8))
    whole, info = baselines.train_unet(ds, **kw)
    state = tmp_path / "unet-state.pt"
    real_step, calls = baselines._unet_step, []

    def stop_at_the_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a killed job: the state written after step 3 is what survives
        return real_step(*a, **k)

    monkeypatch.setattr(baselines, "_unet_step", stop_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        baselines.train_unet(ds, state_path=state, save_every=0.0, **kw)
    monkeypatch.setattr(baselines, "_unet_step", real_step)
    assert torch.load(state, weights_only=True)["step"] == 3
    logs = []
    resumed, rinfo = baselines.train_unet(ds, state_path=state, log=logs.append, **kw)
    assert logs[0].startswith("resumed at step 3") and rinfo["steps"] == info["steps"] == 6
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_unet_state_of_another_recipe_is_refused_by_name(tmp_path):
    ds, state = _Tiny(), tmp_path / "unet-state.pt"
    baselines.train_unet(ds, minutes=None, steps=2, batch_size=4, channels=(8, 8, 8, 8, 8), state_path=state)
    with pytest.raises(ValueError, match=r"unet-state\.pt.*another recipe \(steps 2 there, 4 now\)"):
        baselines.train_unet(ds, minutes=None, steps=4, batch_size=4, channels=(8, 8, 8, 8, 8), state_path=state)
    state.write_bytes(b"not a state")
    with pytest.raises(ValueError, match=r"unet-state\.pt: not a readable U-Net training state"):
        baselines.train_unet(ds, minutes=None, steps=2, batch_size=4, channels=(8, 8, 8, 8, 8), state_path=state)
