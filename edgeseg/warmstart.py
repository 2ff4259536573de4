"""Where a network's first weights come from other than random: the teacher's matching stages
(a student cut from it) or a checkpoint of the same network (fine-tuning, at any input size)."""
from __future__ import annotations

import torch
from torch import nn

from edgeseg.checkpoint import load_model
from edgeseg.errors import EdgesegError
from edgeseg.models import DermoSegDiff, Preset, WSConv2d

__all__ = ["init_from_teacher", "init_weights"]


@torch.no_grad()
def init_from_teacher(student: DermoSegDiff, teacher: DermoSegDiff) -> int:
    """Copy the teacher's weights into the student wherever a stage has the same shape.

    A student is the teacher's depth cut, so its first stages (and the decoder stages that mirror
    them, plus the input/output layers) exist in the teacher. Decoder stage j of the student is
    decoder stage j + (teacher depth - student depth) of the teacher. Returns tensors copied.
    """
    shift = len(teacher.downs) - len(student.downs)
    t_state = teacher.state_dict()
    # a mobile student's plain convs start from the kernels the teacher's WSConv2d applies
    standardized = {f"{n}.weight": m.standardized_weight() for n, m in teacher.named_modules()
                    if isinstance(m, WSConv2d)}
    plain = {f"{n}.weight" for n, m in student.named_modules() if type(m) is nn.Conv2d}
    copied = 0
    for name, tensor in student.state_dict().items():
        src = name
        if name.startswith("ups."):
            j, rest = name[4:].split(".", 1)
            src = f"ups.{int(j) + shift}.{rest}"
        value = standardized[src] if name in plain and src in standardized else t_state.get(src)
        if value is not None and value.shape == tensor.shape:
            tensor.copy_(value)
            copied += 1
    return copied


def init_weights(path: str, p: Preset) -> dict:
    """The weights of checkpoint `path` for a network of preset `p`: the same architecture, except
    that the input size may differ (a 64-px model starts a 128-px one: its tensors have the same shapes)."""
    src = load_model(path)
    a, b = src.preset.architecture(), p.architecture()
    a.pop("image_size"), b.pop("image_size")
    if a != b:
        diff = sorted(k for k in a if a[k] != b[k])
        raise EdgesegError(f"init_from {path}: preset {src.preset.name!r} differs from {p.name!r} in {', '.join(diff)} "
                           "(fine-tuning needs the same network, at any input size)")
    return src.state_dict()
