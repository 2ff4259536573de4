"""Datasets: ISIC 2017 Part 1, ISIC 2018 Task 1, HAM10000, PH2, a user's own folder and a
built-in synthetic set.

``load_dataset(name, split, data_dir=None, size=128, augment=False, seed=0)`` returns a torch
Dataset whose item ``i`` is ``(image, mask, dist)``:

* ``image``: float32 3 x H x W, RGB in [0, 1] (not mean/std normalised; models scale it);
* ``mask``: float32 1 x H x W in {-1, +1}, lesion = +1;
* ``dist``: float32 1 x H x W, :func:`edgeseg.boundary.distance_map` of the (augmented) mask,
  computed in ``__getitem__`` so in the DataLoader workers.

Images are resized once (bilinear image, nearest mask), validated, and cached as uint8 arrays
(see :mod:`edgeseg.data.cache`), opened memory-mapped. ``ds.images`` (N x H x W x 3 uint8),
``ds.masks`` (N x H x W uint8 {0,1}) and ``ds.names`` expose the raw cached arrays.
Augmentation (train split only) is described in :mod:`edgeseg.data.augment`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeseg.errors import DatasetError

__all__ = ["DATASETS", "SPLITS", "load_dataset", "load_arrays", "split_sizes", "SegDataset", "worker_init_fn",
           "cache_root"]

DATASETS = ("isic2017", "isic2018", "ham10000", "ph2", "folder", "synthetic")
#: "all" is every image of the dataset (train, val and test in that order), e.g. PH2 as an
#: external test set for a model trained on ISIC.
SPLITS = ("train", "val", "test", "all")

from edgeseg.data.augment import worker_init_fn  # noqa: E402
from edgeseg.data.cache import cache_root  # noqa: E402

try:
    from torch.utils.data import Dataset as _Base
except ImportError:  # pragma: no cover
    _Base = object


class SegDataset(_Base):
    """Cached image/mask arrays of one split; see the module docstring for the item format."""

    def __init__(self, images, masks, names, name: str, split: str, augment: bool = False,
                 seed: int = 0, cache_dir: Path | None = None):
        self.images, self.masks, self.names = images, masks, list(names)
        self.name, self.split, self.seed, self.epoch = name, split, seed, 0
        self.cache_dir = cache_dir
        self.augment = bool(augment)
        self._aug = None

    def __len__(self) -> int:
        return len(self.names)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_aug"] = None
        return d

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(H x W x 3 uint8 RGB, H x W uint8 {0,1}) after augmentation if enabled."""
        img, m = np.asarray(self.images[i]), np.asarray(self.masks[i])
        if self.augment:
            from edgeseg.data.augment import build_augment, item_seed

            if self._aug is None:
                self._aug = build_augment()
            base = 0
            try:
                from torch.utils.data import get_worker_info

                info = get_worker_info()
                if info is not None:
                    base = info.seed - info.id
            except ImportError:  # pragma: no cover
                pass
            self._aug.set_random_seed(item_seed(self.seed, self.epoch, i, base))
            r = self._aug(image=img, mask=m)
            img, m = r["image"], r["mask"]
        return img, m

    def __getitem__(self, i: int):
        import torch

        from edgeseg.boundary import distance_map

        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        img, m = self.raw(i)
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), np.float32) / 255.0)
        m01 = (m > 0).astype(np.float32)
        mask = torch.from_numpy(m01 * 2 - 1)[None]
        dist = torch.from_numpy(distance_map(m01))[None]
        return image, mask, dist

    def __repr__(self) -> str:
        return f"SegDataset({self.name!r}, {self.split!r}, n={len(self)}, augment={self.augment})"


def load_arrays(name: str, data_dir=None, size: int = 128, seed: int = 0):
    """Validated, resized, cached arrays of every split: ({split: (images, masks, names)}, dir)."""
    from edgeseg.data import cache

    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name == "synthetic":
        from edgeseg.data import synthetic

        key = cache.cache_key(["synthetic", synthetic.GENERATOR_VERSION, seed, size,
                               synthetic.SPLITS])

        def build():
            out = {}
            for split, n in synthetic.SPLITS.items():
                im, m = synthetic.generate_split(split, n, seed=seed, size=size)
                out[split] = (im, m, [f"synth_{split}_{i:05d}" for i in range(n)])
            return out

        return cache.load_or_build(f"synthetic-s{seed}", size, key, build)

    from edgeseg.data import layouts, validate

    root, pairs, split_files = _discover(name, data_dir)
    extra = []
    if split_files:
        extra = cache.file_key([root / f"{k}.txt" for k in split_files], root)
    files = [f for p in pairs for f in (p.image, p.mask)]
    key = cache.cache_key([name, size, str(root), cache.file_key(files, root), extra])

    def build():
        images, masks = validate.read_all(pairs, size, root)
        index = {p.id: i for i, p in enumerate(pairs)}
        out = {}
        for split, ids in _split_ids(name, pairs, split_files).items():
            sel = np.array([index[i] for i in ids], np.int64)
            out[split] = (images[sel], masks[sel], ids)
        return out

    return cache.load_or_build(name, size, key, build)


def split_sizes(name: str, data_dir=None) -> dict[str, int]:
    """{split: number of images} from the folder listing alone (nothing decoded): what settings
    such as the batch size are checked against before any work."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name == "synthetic":
        from edgeseg.data import synthetic

        return dict(synthetic.SPLITS)
    _, pairs, split_files = _discover(name, data_dir)
    return {split: len(ids) for split, ids in _split_ids(name, pairs, split_files).items()}


def _discover(name: str, data_dir):
    """(root, image/mask pairs, split files or None) of a dataset folder, from its listing."""
    from edgeseg.data import layouts

    if data_dir is None:
        raise DatasetError(f"dataset {name!r} needs --data-dir (a folder laid out as "
                           f"{layouts.LAYOUT_HELP[name]})")
    root = Path(data_dir).expanduser().resolve()
    pairs = layouts.discover(name, root)
    return root, pairs, layouts.read_split_files(root) if name == "folder" else None


def _split_ids(name: str, pairs, split_files) -> dict[str, list[str]]:
    """{split: ids}: the release's own splits, else the split files, else the seeded fractions."""
    from edgeseg.data import layouts

    return layouts.fixed_splits(pairs) or layouts.split_ids([p.id for p in pairs], name, split_files)


def load_dataset(name: str, split: str, data_dir=None, size: int = 128, augment: bool = False,
                 seed: int = 0) -> SegDataset:
    """The ``split`` of dataset ``name`` (one of DATASETS) as a :class:`SegDataset`.

    ``augment`` only applies to the train split. ``seed`` seeds the augmentation and, for
    ``synthetic``, the generator. Raises DatasetError for any bad input.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    arrays, d = load_arrays(name, data_dir, size, seed if name == "synthetic" else 0)
    if split == "all":
        parts = [arrays[s] for s in ("train", "val", "test") if s in arrays]
        arrays = {"all": (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                          [n for p in parts for n in p[2]])}
    if split not in arrays or len(arrays[split][2]) == 0:
        where = data_dir if data_dir is not None else name
        raise DatasetError(f"{where}: empty dataset, the {split} split has no images")
    im, m, names = arrays[split]
    return SegDataset(im, m, names, name, split, augment=augment and split == "train", seed=seed,
                      cache_dir=d)
