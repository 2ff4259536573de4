"""Tiny dataset folders laid out exactly like the official releases (helpers for test_data)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

ISIC_IMG, ISIC_GT = "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"
HAM_P1, HAM_P2 = "HAM10000_images_part_1", "HAM10000_images_part_2"
HAM_GT = "HAM10000_segmentations_lesion_tschandl"


def write_pair(img_path: Path, mask_path: Path, i: int, w: int = 24, h: int = 20, fmt: str | None = None,
               one_bit: bool = False) -> None:
    """A dark rectangular lesion on noisy skin; ``fmt`` forces the file format (e.g. "BMP"),
    ``one_bit`` saves the mask as a 1-bit image."""
    rng = np.random.default_rng(i)
    img = rng.integers(150, 230, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    img[mask > 0] //= 3
    img_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(img_path, format=fmt, **({} if fmt else {"quality": 95}))
    m = Image.fromarray(mask)
    (m.convert("1") if one_bit else m).save(mask_path, format=fmt)


def make_isic(root: Path, n: int = 10) -> Path:
    (root / ISIC_IMG).mkdir(parents=True, exist_ok=True)
    (root / ISIC_GT).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_pair(root / ISIC_IMG / f"ISIC_{i:07d}.jpg",
                   root / ISIC_GT / f"ISIC_{i:07d}_segmentation.png", i)
    (root / "LICENSE.txt").write_text("CC-0\n")
    (root / "ATTRIBUTION.txt").write_text("ISIC archive\n")
    (root / ISIC_IMG / "ATTRIBUTION.txt").write_text("ISIC archive\n")
    (root / ISIC_IMG / "LICENSE.txt").write_text("CC-0\n")
    (root / ISIC_GT / "ATTRIBUTION.txt").write_text("ISIC archive\n")
    (root / "ISIC2018_Task3_Training_GroundTruth.csv").write_text("image,MEL\nISIC_0000000,0\n")
    return root


def make_ham(root: Path, n: int = 10) -> Path:
    for i in range(n):
        part = HAM_P1 if i < n // 2 else HAM_P2
        iid = f"ISIC_{24306 + i:07d}"
        write_pair(root / part / f"{iid}.jpg", root / HAM_GT / f"{iid}_segmentation.png", i)
    (root / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\nHAM_0000118,ISIC_0024306,bkl\n")
    (root / "hmnist_28_28_RGB.csv").write_text("pixel0000\n1\n")
    (root / HAM_GT / "LICENSE.txt").write_text("CC BY-NC\n")
    return root


def make_folder(root: Path, n: int = 10, suffix: str = "_mask") -> Path:
    for i in range(n):
        write_pair(root / "images" / f"case{i:03d}.png", root / "masks" / f"case{i:03d}{suffix}.png", i)
    (root / "README.txt").write_text("my lesions\n")
    return root


ISIC17 = {  # split: (image folder, ground-truth folder), as in the official ISIC 2017 release
    "train": ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
    "val": ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
    "test": ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"),
}
PH2_IMAGES = "PH2 Dataset images"


def make_isic2017(root: Path, sizes=(5, 2, 3)) -> Path:
    """Official ISIC 2017 Part 1 layout, with the superpixel PNGs and metadata CSVs it ships."""
    start = 0
    for (split, (img_dir, gt_dir)), n in zip(ISIC17.items(), sizes):
        for i in range(start, start + n):
            iid = f"ISIC_{i:07d}"
            write_pair(root / img_dir / f"{iid}.jpg", root / gt_dir / f"{iid}_segmentation.png", i)
            Image.fromarray(np.full((20, 24, 3), i, np.uint8)).save(root / img_dir / f"{iid}_superpixels.png")
        (root / img_dir / f"{img_dir}_metadata.csv").write_text("image_id,age_approximate,sex\n")
        start += n
    return root


def make_ph2(root: Path, n: int = 10) -> Path:
    """Official PH2 layout: PH2Dataset/PH2 Dataset images/IMDxxx/{image, lesion, roi folders}."""
    cases = root / PH2_IMAGES
    for k in range(n):
        cid = f"IMD{2 + 3 * k:03d}"
        case = cases / cid
        write_pair(case / f"{cid}_Dermoscopic_Image" / f"{cid}.bmp", case / f"{cid}_lesion" / f"{cid}_lesion.bmp",
                   k, fmt="BMP", one_bit=k % 2 == 0)
        (case / f"{cid}_roi").mkdir()
        Image.fromarray(np.zeros((20, 24), np.uint8)).save(case / f"{cid}_roi" / f"{cid}_R1_Label4.bmp")
    (root / "PH2_dataset.txt").write_text("|| Name || Histological Diagnosis ||\n")
    (root / "PH2_dataset.xlsx").write_bytes(b"PK\x03\x04 not a real workbook")
    return root
