"""Folder layouts (ISIC 2017 Part 1, ISIC 2018 Task 1, HAM10000, PH2, a user's own folder).

Each layout turns a data directory into a sorted list of ``Pair(id, image, mask, split)``; the
official releases carry extra files (licence, attribution, metadata CSVs, ISIC 2017's
superpixel PNGs, PH2's ROI folders and spreadsheets) which are ignored. ``split`` is set where
the release itself fixes the split (ISIC 2017's three folders). Every problem raises
:class:`edgeseg.errors.DatasetError` with one line naming the file or folder.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from edgeseg.errors import DatasetError

__all__ = ["Pair", "IMAGE_EXTS", "OFFICIAL_SPLITS", "FOLDER_FRACTIONS", "discover", "split_ids",
           "split_counts", "fixed_splits", "LAYOUT_HELP"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
#: Official split sizes (train, val, test) in sorted id order.
OFFICIAL_SPLITS = {"isic2018": (1815, 259, 520), "ham10000": (7200, 1800, 1015), "ph2": (80, 20, 100)}
FOLDER_FRACTIONS = (0.7, 0.1, 0.2)
ISIC_IMG, ISIC_GT = "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"
HAM_PARTS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
HAM_GT = "HAM10000_segmentations_lesion_tschandl"
ISIC17_FOLDERS = {  # split: (image folder, ground-truth folder) of the official release
    "train": ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
    "val": ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
    "test": ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"),
}
PH2_IMAGES = "PH2 Dataset images"
LAYOUT_HELP = {
    "isic2017": "ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_*.jpg + "
                "ISIC-2017_{Training,Validation,Test_v2}_Part1_GroundTruth/ISIC_*_segmentation.png",
    "ph2": f"PH2Dataset/{PH2_IMAGES}/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp + "
           "IMDxxx/IMDxxx_lesion/IMDxxx_lesion.bmp",
    "isic2018": f"{ISIC_IMG}/ISIC_*.jpg + {ISIC_GT}/ISIC_*_segmentation.png",
    "ham10000": f"{HAM_PARTS[0]}/ + {HAM_PARTS[1]}/ (ISIC_*.jpg) + {HAM_GT}/ISIC_*_segmentation.png",
    "folder": "images/<name>.<ext> + masks/<name>[_segmentation|_mask].png",
}
_MASK_SUFFIXES = ("_segmentation", "_mask")


@dataclass(frozen=True)
class Pair:
    id: str
    image: Path
    mask: Path
    split: str | None = None  # fixed by the release's folders (ISIC 2017), else None


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as e:
        raise DatasetError(f"{folder}: cannot list the folder ({e.strerror or e})") from None


def _files(folder: Path, skip_suffix: str | None = None) -> list[Path]:
    return sorted(p for p in _entries(folder)
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS
                  and not (skip_suffix and p.stem.endswith(skip_suffix)))


def _require_dir(root: Path, name: str, layout: str) -> Path:
    d = root / name
    if d.is_dir():
        return d
    present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    close = difflib.get_close_matches(name, present, n=1, cutoff=0.6)
    hint = f"; found {close[0]}/ instead" if close else (
        f"; found {', '.join(present[:4])}" if present else "")
    raise DatasetError(f"{root}: missing folder {name}/ (expected the {layout} layout: "
                       f"{LAYOUT_HELP[layout]}){hint}")


def _strip_mask_suffix(stem: str) -> str:
    for suf in _MASK_SUFFIXES:
        if stem.endswith(suf):
            return stem[: -len(suf)]
    return stem


def _pair(images: list[Path], masks: list[Path], root: Path, layout: str,
          expected_mask: str) -> list[Pair]:
    by_id_img: dict[str, Path] = {}
    for p in images:
        if p.stem in by_id_img:
            raise DatasetError(f"{p}: duplicate image id {p.stem} (also {by_id_img[p.stem]})")
        by_id_img[p.stem] = p
    by_id_mask: dict[str, Path] = {}
    for p in masks:
        key = _strip_mask_suffix(p.stem)
        if key in by_id_mask:
            raise DatasetError(f"{p}: duplicate mask for id {key} (also {by_id_mask[key]})")
        by_id_mask[key] = p
    no_mask = sorted(set(by_id_img) - set(by_id_mask))
    if no_mask:
        p = by_id_img[no_mask[0]]
        raise DatasetError(f"{p.relative_to(root)}: image has no mask (expected "
                           f"{expected_mask.format(id=no_mask[0])}); {len(no_mask)} image(s) "
                           f"without a mask in {root}")
    no_img = sorted(set(by_id_mask) - set(by_id_img))
    if no_img:
        p = by_id_mask[no_img[0]]
        raise DatasetError(f"{p.relative_to(root)}: mask has no image (id {no_img[0]}); "
                           f"{len(no_img)} mask(s) without an image in {root}")
    if not by_id_img:
        raise DatasetError(f"{root}: empty dataset, no image/mask pairs found (expected the "
                           f"{layout} layout: {LAYOUT_HELP[layout]})")
    return [Pair(i, by_id_img[i], by_id_mask[i]) for i in sorted(by_id_img)]


def discover(name: str, data_dir: str | os.PathLike) -> list[Pair]:
    """All image/mask pairs of a dataset folder, sorted by id."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder does not exist (expected the {name} layout: "
                           f"{LAYOUT_HELP[name]})")
    if name == "isic2018":
        img_dir = _require_dir(root, ISIC_IMG, name)
        gt_dir = _require_dir(root, ISIC_GT, name)
        return _pair(_files(img_dir), _files(gt_dir), root, name,
                     f"{ISIC_GT}/{{id}}_segmentation.png")
    if name == "ham10000":
        gt_dir = _require_dir(root, HAM_GT, name)
        parts = [_require_dir(root, p, name) for p in HAM_PARTS]
        images = sorted((f for d in parts for f in _files(d)), key=lambda p: p.name)
        return _pair(images, _files(gt_dir), root, name, f"{HAM_GT}/{{id}}_segmentation.png")
    if name == "isic2017":
        return _discover_isic2017(root)
    if name == "ph2":
        return _discover_ph2(root)
    if name == "folder":
        img_dir = _require_dir(root, "images", name)
        mask_dir = _require_dir(root, "masks", name)
        return _pair(_files(img_dir), _files(mask_dir), root, name, "masks/{id}.png")
    raise DatasetError(f"unknown layout {name!r}")


def _discover_isic2017(root: Path) -> list[Pair]:
    """The three official splits, each from its own image and ground-truth folder."""
    pairs: list[Pair] = []
    for split, (img_name, gt_name) in ISIC17_FOLDERS.items():
        img_dir, gt_dir = _require_dir(root, img_name, "isic2017"), _require_dir(root, gt_name, "isic2017")
        found = _pair(_files(img_dir, skip_suffix="_superpixels"), _files(gt_dir), root, "isic2017",
                      f"{gt_name}/{{id}}_segmentation.png")
        pairs += [Pair(p.id, p.image, p.mask, split) for p in found]
    seen: dict[str, Pair] = {}
    for p in pairs:
        if p.id in seen:
            raise DatasetError(f"{p.image.relative_to(root)}: id {p.id} is in two splits (also "
                               f"{seen[p.id].image.relative_to(root)})")
        seen[p.id] = p
    return sorted(pairs, key=lambda p: p.id)


def _ph2_case(case: Path, root: Path) -> Pair:
    cid = case.name
    image = case / f"{cid}_Dermoscopic_Image" / f"{cid}.bmp"
    mask = case / f"{cid}_lesion" / f"{cid}_lesion.bmp"
    for path, what in ((image, "dermoscopic image"), (mask, "lesion mask")):
        if not path.is_file():
            raise DatasetError(f"{case.relative_to(root.parent)}: PH2 case folder has no {what} "
                               f"(expected {path.relative_to(case)})")
    return Pair(cid, image, mask)


def _discover_ph2(root: Path) -> list[Pair]:
    """PH2: ``root`` is ``PH2Dataset/`` or its ``PH2 Dataset images/`` folder of IMDxxx cases."""
    cases_dir = root / PH2_IMAGES if (root / PH2_IMAGES).is_dir() else root
    cases = sorted(p for p in _entries(cases_dir) if p.is_dir() and p.name.startswith("IMD"))
    if not cases:
        raise DatasetError(f"{root}: no PH2 case folders IMDxxx/ found (expected the ph2 layout: "
                           f"{LAYOUT_HELP['ph2']})")
    return [_ph2_case(c, cases_dir) for c in cases]


def fixed_splits(pairs: list[Pair]) -> dict[str, list[str]] | None:
    """{split: ids} where the release fixes the splits by folder (ISIC 2017), else None."""
    if not pairs or pairs[0].split is None:
        return None
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for p in pairs:
        out[p.split].append(p.id)
    return out


def split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, val, test) sizes for ``n`` ids: rounded proportions, test takes the rest.

    With at least 3 ids every split gets at least one (tiny fixtures and folders).
    """
    tr = int(round(n * fractions[0]))
    va = int(round(n * fractions[1]))
    if n >= 3:
        tr, va = max(tr, 1), max(va, 1)
        tr = min(tr, n - va - 1)
    va = min(va, n - tr)
    return tr, va, n - tr - va


def split_ids(ids: list[str], dataset: str, split_files: dict[str, list[str]] | None = None
              ) -> dict[str, list[str]]:
    """Split ids (sorted first) into train/val/test.

    isic2018, ham10000 and ph2 use the official sizes (1815/259/520 of 2594, 7200/1800/1015 of
    10015, DermoSegDiff's 80/20/100 of PH2's 200); with a different number of ids (fixtures,
    partial downloads) the same proportions are used. ``folder`` uses 70/10/20, or ``split_files`` when given.
    """
    ids = sorted(ids)
    if split_files:
        known = set(ids)
        out = {}
        for k in ("train", "val", "test"):
            out[k] = list(split_files.get(k, []))
            for i in out[k]:
                if i not in known:
                    raise DatasetError(f"{k}.txt: id {i!r} has no image/mask pair")
        return out
    if dataset in OFFICIAL_SPLITS:
        sizes = OFFICIAL_SPLITS[dataset]
        fr = tuple(x / sum(sizes) for x in sizes)
    else:
        fr = FOLDER_FRACTIONS
    tr, va, _ = split_counts(len(ids), fr)
    return {"train": ids[:tr], "val": ids[tr:tr + va], "test": ids[tr + va:]}


def read_split_files(data_dir: str | os.PathLike) -> dict[str, list[str]] | None:
    """``train.txt`` / ``val.txt`` / ``test.txt`` (one id per line) in a folder dataset."""
    root = Path(data_dir)
    found = {k: root / f"{k}.txt" for k in ("train", "val", "test") if (root / f"{k}.txt").is_file()}
    if not found:
        return None
    return {k: [_strip_mask_suffix(Path(line.strip()).stem) for line in p.read_text().splitlines()
                if line.strip()] for k, p in found.items()}
