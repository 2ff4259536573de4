"""`edgeseg segment`: segment photos with a checkpoint or an exported model."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from edgeseg.cli.common import user_errors


def _output_stems(images: List[Path]) -> list[str]:
    """A distinct output name per input: the file's stem, qualified where two inputs share one
    (a/x.png and b/x.jpg -> a_x_png, b_x_jpg) so no result overwrites another."""
    stems = [p.stem for p in images]
    out = []
    for p, stem in zip(images, stems):
        name = stem if stems.count(stem) == 1 else f"{p.parent.name}_{stem}_{p.suffix.lstrip('.')}".lstrip("_")
        while name in out:
            name += "_"
        out.append(name)
    return out


@user_errors
def segment(
    images: List[Path] = typer.Argument(..., help="image files (jpg/png/bmp/tif, any size)"),
    checkpoint: Optional[Path] = typer.Option(None, help="weights file, run folder or shipped model name; default: "
                                              "the newest run's student, else the shipped real-lesion student"),
    model: Optional[Path] = typer.Option(None, "--model", help="an exported .pte to run with the ExecuTorch runtime"),
    runs_dir: Path = typer.Option(Path("runs"), help="where to look for the newest run"),
    steps: Optional[int] = typer.Option(None, min=1, max=250, help="DDIM steps (eager checkpoints; default from the defaults table)"),
    ensemble: Optional[int] = typer.Option(None, min=1, max=64, help="ensemble size (eager checkpoints; default from the table)"),
    out: Path = typer.Option(Path("segmentations"), help="output folder"),
    seed: int = typer.Option(0, help="sampling seed"),
):
    """Segment photos: writes <name>_mask.png (the photo's size), <name>_overlay.png, <name>_uncertainty.png.
    What each shipped model is for and where it fails: docs/models/."""
    import numpy as np

    from edgeseg.errors import EdgesegError
    from edgeseg.imageio import write_image
    from edgeseg.runs import resolve_checkpoint
    from edgeseg.segmenter import Segmenter
    from edgeseg.viz import outline_overlay, uncertainty_heatmap

    for path in images:  # every input checked before any model loads or any file is written
        if not path.is_file():
            raise EdgesegError(f"{path}: no such image file" if not path.exists() else f"{path}: not a regular file")
    source = model if model is not None else resolve_checkpoint(checkpoint, "student", runs_dir)
    seg = Segmenter.from_pretrained(source, steps=steps, ensemble=ensemble, seed=seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgesegError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    typer.echo(f"model: {seg}", err=True)
    for path, stem in zip(images, _output_stems(images)):
        result, rgb = seg.segment_photo(path)
        hw = result.mask.shape
        write_image(out / f"{stem}_mask.png", result.mask.astype(np.uint8) * 255)
        write_image(out / f"{stem}_overlay.png", outline_overlay(rgb, result.probability))
        write_image(out / f"{stem}_uncertainty.png", uncertainty_heatmap(result.uncertainty))
        typer.echo(f"{path}: {hw[1]}x{hw[0]}, lesion {100 * result.lesion_fraction:.1f}% of the image, mean "
                   f"uncertainty {float(result.uncertainty.mean()):.3f} -> {out / (stem + '_mask.png')}")
