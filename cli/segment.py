"""`edgeseg segment`: segment photos with a checkpoint or an exported model.

A batch fails whole or not at all: every photo is decode-checked (header) and every output name
planned and checked (bounded, unique, replacing no input and, without --overwrite, no file at
all) before the model loads; the output folder is held (flock) for the run so two runs cannot
mix one photo's files; a photo that fails later removes the files this run wrote.
``--skip-unreadable`` instead skips photos that cannot be read, lists them, and exits with
:data:`EXIT_SKIPPED`.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

from edgeseg.cli.common import SEED_MAX, given_path, user_errors

EXIT_SKIPPED = 3  # some photos were unreadable and skipped (--skip-unreadable); the others are done
SUFFIXES = ("_mask.png", "_overlay.png", "_uncertainty.png")


def _name_budget(out: Path) -> int:
    """Bytes left for a stem: the folder's name limit, less the longest suffix and the room
    atomic writes need for their hidden temp name (".<name>.XXXXXXXX.tmp")."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        name_max = os.pathconf(probe if probe.exists() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    return name_max - max(len(s) for s in SUFFIXES) - len(".") - len(".XXXXXXXX.tmp") - 8


def _bounded(name: str, key: str, budget: int) -> str:
    """`name` cut to `budget` bytes, with a short hash of `key` (the input's path) kept unique."""
    if len(os.fsencode(name)) <= budget:
        return name
    tag = "-" + hashlib.sha1(os.fsencode(key)).hexdigest()[:10]
    raw = os.fsencode(name)[: budget - len(tag)]
    return raw.decode(errors="ignore") + tag  # never split a multi-byte character


def _output_stems(images: List[Path], budget: int = 200) -> list[str]:
    """A distinct, bounded output name per input: the file's stem, qualified where two inputs
    share one (a/x.png and b/x.jpg -> a_x_png, b_x_jpg), numbered where that still clashes."""
    stems = [p.stem for p in images]
    out: list[str] = []
    taken: set[str] = set()
    for p, stem in zip(images, stems):
        name = stem if stems.count(stem) == 1 else f"{p.parent.name}_{stem}_{p.suffix.lstrip('.')}".lstrip("_")
        name = _bounded(name or "image", str(p), budget)
        base, k = name, 2
        while name.casefold() in taken:  # case-insensitive folders (macOS) would merge A and a
            name = _bounded(base, str(p), budget - 8) + f"-{k}"
            k += 1
        taken.add(name.casefold())
        out.append(name)
    return out


def _unique_inputs(images: List[Path]) -> list[Path]:
    """Inputs in order, each file once (the same file by another path or link counts once)."""
    from edgeseg.errors import EdgesegError

    seen, out = set(), []
    for path in images:
        if not path.is_file():
            raise EdgesegError(f"{path}: no such image file" if not path.exists() else f"{path}: not a regular file")
        st = path.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(path)
    return out


def _readable(images: List[Path], skip: bool) -> tuple[list[Path], list[str]]:
    """(photos whose header decodes, one reason per unreadable one); without `skip` the first
    unreadable photo is the run's one error line."""
    from edgeseg.errors import ImageReadError
    from edgeseg.imageio import check_image

    ok, bad = [], []
    for path in images:
        try:
            check_image(path)
            ok.append(path)
        except ImageReadError as e:
            if not skip:
                raise
            bad.append(str(e))
    return ok, bad


def _check_outputs(images: List[Path], stems: list[str], out: Path, overwrite: bool) -> None:
    """No output may replace an input; without --overwrite, none may replace any file."""
    from edgeseg.errors import EdgesegError

    inputs = {(s.st_dev, s.st_ino) for s in (p.stat() for p in images)}
    for stem in stems:
        for suffix in SUFFIXES:
            target = out / f"{stem}{suffix}"
            if not os.path.lexists(target):
                continue
            st = target.stat() if target.exists() else None
            if st is not None and (st.st_dev, st.st_ino) in inputs:
                raise EdgesegError(f"{target}: is one of the input photos; choose another --out")
            if target.is_dir() or target.is_symlink():
                raise EdgesegError(f"{target}: cannot write the result, something that is not a regular file is in the "
                                  "way; choose another --out")
            if not overwrite:
                raise EdgesegError(f"{target}: exists; give --overwrite to replace it, or another --out")


@contextmanager
def _held(out: Path):
    """Hold the output folder (an exclusive flock on the folder itself: no file is written)."""
    import fcntl

    from edgeseg.errors import EdgesegError

    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgesegError(f"{out}: in use by another 'edgeseg segment' run; wait for it or choose another "
                               "--out") from None
        yield
    finally:
        os.close(fd)


def _make_folder(out: Path) -> list[Path]:
    """Create `out`; the folders this created (removed again if the run writes nothing)."""
    from edgeseg.errors import EdgesegError

    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgesegError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    return created


def _segment_one(seg, path: Path, out: Path, stem: str, written: list[Path]) -> str:
    """Write one photo's three PNGs (appended to `written` as they land); its report line."""
    import numpy as np

    from edgeseg.imageio import write_image
    from edgeseg.viz import outline_overlay, uncertainty_heatmap

    result, rgb = seg.segment_photo(path)
    hw = result.mask.shape
    pictures = (result.mask.astype(np.uint8) * 255, outline_overlay(rgb, result.mask),
                uncertainty_heatmap(result.uncertainty))
    for suffix, picture in zip(SUFFIXES, pictures):
        written.append(write_image(out / f"{stem}{suffix}", picture))
    return (f"{path}: {hw[1]}x{hw[0]}, lesion {100 * result.lesion_fraction:.1f}% of the image, mean "
            f"uncertainty {float(result.uncertainty.mean()):.3f} -> {out / (stem + '_mask.png')}")


def _run(seg, todo: list[tuple[Path, str]], out: Path, skip: bool, skipped: list[str]) -> None:
    """Segment every photo; on a failure the files this run wrote are removed (with --skip-unreadable
    an unreadable photo is skipped instead)."""
    from edgeseg.errors import ImageReadError

    written: list[Path] = []
    try:
        for path, stem in todo:
            mark = len(written)
            try:
                typer.echo(_segment_one(seg, path, out, stem, written))
            except ImageReadError as e:
                if not skip:
                    raise
                for p in written[mark:]:
                    p.unlink(missing_ok=True)
                del written[mark:]
                skipped.append(str(e))
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise


@user_errors
def segment(
    images: List[Path] = typer.Argument(..., help="image files (jpg/png/bmp/tif, any size)"),
    checkpoint: Optional[Path] = typer.Option(None, help="weights file, run folder or shipped model name; default: "
                                              "the newest run's student, else the shipped real-lesion student"),
    model: Optional[Path] = typer.Option(None, "--model", help="an exported .pte to run with the ExecuTorch runtime"),
    runs_dir: Path = typer.Option(Path("runs"), help="where to look for the newest run"),
    steps: Optional[int] = typer.Option(None, min=1, max=250, help="DDIM steps (eager checkpoints; default from the defaults table)"),
    ensemble: Optional[int] = typer.Option(None, min=1, max=64, help="ensemble size (eager checkpoints; default from the table)"),
    out: str = typer.Option("segmentations", help="output folder"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="sampling seed"),
    overwrite: bool = typer.Option(False, help="replace result files that exist (never an input photo)"),
    skip_unreadable: bool = typer.Option(False, help="skip photos that cannot be read, list them, and exit with "
                                         f"code {EXIT_SKIPPED} (default: refuse the whole batch, exit 2)"),
):
    """Segment photos: writes <name>_mask.png (the photo's size), <name>_overlay.png, <name>_uncertainty.png.

    Every photo and output name is checked before the model loads; a bad photo is one error line
    (exit 2) with nothing written, unless --skip-unreadable. What each shipped model is for and where
    it fails: docs/models/."""
    from edgeseg.errors import EdgesegError
    from edgeseg.runs import resolve_checkpoint
    from edgeseg.segmenter import Segmenter

    out = given_path(out, "--out")
    if out.exists() and not out.is_dir():
        raise EdgesegError(f"{out}: --out exists and is not a folder")
    unique = _unique_inputs(images)
    photos, skipped = _readable(unique, skip_unreadable)
    stems = _output_stems(photos, _name_budget(out))
    if not photos:
        raise EdgesegError(f"no readable photo among the {len(images)} given ({skipped[0]})")
    if out.is_dir():
        _check_outputs(photos, stems, out, overwrite)
    source = model if model is not None else resolve_checkpoint(checkpoint, "student", runs_dir)
    seg = Segmenter.from_pretrained(source, steps=steps, ensemble=ensemble, seed=seed)
    created = _make_folder(out)
    try:
        with _held(out):
            _check_outputs(photos, stems, out, overwrite)  # again, now that no other run can write here
            typer.echo(f"model: {seg}", err=True)
            _run(seg, list(zip(photos, stems)), out, skip_unreadable, skipped)
    finally:
        for folder in created:  # deepest first: only folders this run made and left empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    if skipped:
        for reason in skipped:
            typer.echo(f"skipped: {reason}", err=True)
        typer.echo(f"{len(skipped)} of {len(unique)} photo(s) skipped as unreadable "
                   f"(exit code {EXIT_SKIPPED})", err=True)
        raise typer.Exit(EXIT_SKIPPED)
