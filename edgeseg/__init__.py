"""edgeseg: distil a diffusion skin-lesion segmenter into a small student and put it on phones.

>>> import edgeseg
>>> seg = edgeseg.Segmenter.from_pretrained()
>>> result = seg.segment("lesion.jpg")       # .mask, .probability, .uncertainty at the photo's size

Heavy modules (torch) load on first use, so ``import edgeseg`` and ``edgeseg --help`` stay fast.
"""
from __future__ import annotations

__all__ = ["Segmenter", "Segmentation", "EdgesegError"]

_LAZY = {"Segmenter": "edgeseg.segmenter", "Segmentation": "edgeseg.segmenter", "EdgesegError": "edgeseg.errors"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeseg' has no attribute {name!r}")
