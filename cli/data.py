"""`edgeseg data preview|info`: look at and validate a dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeseg.cli.common import SEED_MAX, check_range, user_errors

app = typer.Typer(help="Inspect and validate datasets.", no_args_is_help=True)

PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@app.command()
@user_errors
def preview(
    dataset: str = typer.Option(..., "--dataset", help="isic2017 | isic2018 | ham10000 | ph2 | folder | synthetic"),
    out: Path = typer.Option(..., "--out", help="PNG file to write the grid to"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="dataset folder"),
    split: str = typer.Option("train", "--split", help="train | val | test"),
    n: int = typer.Option(32, "--n", help="number of examples"),
    cols: int = typer.Option(8, "--cols", help="grid columns"),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="synthetic generator seed"),
    overwrite: bool = typer.Option(False, help="replace --out if it exists"),
) -> None:
    """Validate the dataset and write a grid of images with their mask outlines."""
    from edgeseg.errors import SettingsError

    if out.suffix.lower() not in PREVIEW_SUFFIXES:
        raise SettingsError(f"{out}: --out must be an image file ending in {', '.join(PREVIEW_SUFFIXES)}")
    if out.is_dir():
        raise SettingsError(f"{out}: --out is a folder; give an image file name")
    if out.exists() and not overwrite:
        raise SettingsError(f"{out}: exists; pass --overwrite to replace it")
    check_range("--n", n, 1)
    check_range("--cols", cols, 1)

    import cv2
    import numpy as np

    from edgeseg.data import load_dataset
    from edgeseg.imageio import write_image

    ds = load_dataset(dataset, split, data_dir=data_dir, seed=seed)
    k = min(n, len(ds))
    idx = np.linspace(0, len(ds) - 1, k).round().astype(int) if k < len(ds) else range(k)
    tiles = []
    for i in idx:
        img = np.array(ds.images[i])  # a writable copy (the cache is memory-mapped read-only)
        m = (np.asarray(ds.masks[i]) > 0).astype(np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, contours, -1, (80, 255, 80), 1)
        tiles.append(cv2.copyMakeBorder(img, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=(255, 255, 255)))
    rows = (len(tiles) + cols - 1) // cols
    blank = np.full_like(tiles[0], 255)
    tiles += [blank] * (rows * cols - len(tiles))
    grid = np.concatenate([np.concatenate(tiles[r * cols:(r + 1) * cols], 1) for r in range(rows)], 0)
    write_image(out, grid)
    typer.echo(f"{dataset}/{split}: {len(ds)} images validated; wrote {k} examples to {out}")


@app.command()
@user_errors
def info(
    dataset: str = typer.Option(..., "--dataset", help="isic2017 | isic2018 | ham10000 | ph2 | folder | synthetic"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="dataset folder"),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="synthetic generator seed"),
) -> None:
    """Validate the dataset and print split sizes and class balance."""
    import numpy as np

    from edgeseg.data import SPLITS, load_arrays

    if dataset != "synthetic" and data_dir is None:
        from edgeseg.data import load_dataset

        load_dataset(dataset, "train", data_dir=None)  # raises the right one-line error
    arrays, cache_dir = load_arrays(dataset, data_dir, seed=seed if dataset == "synthetic" else 0)
    typer.echo(f"dataset {dataset} (cache: {cache_dir})")
    typer.echo(f"{'split':<6} {'images':>7} {'lesion px':>10} {'empty masks':>12}")
    for split in SPLITS:
        if split not in arrays:
            continue
        _, m, names = arrays[split]
        frac = float(np.mean([np.asarray(x).mean() for x in m])) if len(names) else 0.0
        empty = int(sum(1 for x in m if not np.asarray(x).any()))
        typer.echo(f"{split:<6} {len(names):>7} {frac:>9.1%} {empty:>12}")
