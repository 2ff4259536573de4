"""The torchrun worker of the DDP test.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT``:
every rank trains the micro student (global batch 8 -> 4 per rank, gloo on CPU) and rank 0 writes
``OUT/ddp_model.safetensors`` (online weights), ``OUT/ddp_ema.safetensors`` and ``OUT/ddp.json``.
``tests/test_train.py`` runs the same config in one process and compares.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from micro import ddp_config, micro_datasets, micro_teacher, register_micro  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file

    from edgeseg.train import Trainer

    import edgeseg.viz

    edgeseg.viz.plot_curves = lambda *a, **k: None  # not under test here; saves seconds
    register_micro()
    out_dir = Path(out)
    train, val = micro_datasets()
    trainer = Trainer(ddp_config(), out_dir / "train", teacher=micro_teacher(), train_ds=train, val_ds=val,
                      quiet=True)
    assert trainer.world == int(os.environ["WORLD_SIZE"]) == 2, (trainer.world, os.environ.get("WORLD_SIZE"))
    trainer.fit()
    if trainer.rank == 0:
        save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()},
                  str(out_dir / "ddp_model.safetensors"))
        save_file({k: v.contiguous() for k, v in trainer.ema.model.state_dict().items()},
                  str(out_dir / "ddp_ema.safetensors"))
        (out_dir / "ddp.json").write_text(json.dumps({"step": trainer.step, "history": trainer.history,
                                                      "world": trainer.world}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
