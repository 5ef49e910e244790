"""Datasets for the examples, tests and benchmarks.

Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` package when it is installed
(``/usr/share/datasets/fashion-mnist``), else from ``data_path`` (IDX files, or torchvision's layout,
downloading there if allowed). Other torchvision datasets (``cifar10``, ``cifar100``, ``mnist``) come from
``data_path`` through torchvision.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

#: name -> (torchvision class name, channels, mean, std)
DATASETS = {
    "fashion_mnist": ("FashionMNIST", 1, (0.2860,), (0.3530,)),
    "mnist": ("MNIST", 1, (0.1307,), (0.3081,)),
    "cifar10": ("CIFAR10", 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz", root / "FashionMNIST" / "raw" / stem):
        if candidate.exists():
            return candidate
    return None


def _idx_dataset(root: Path, train: bool, mean, std) -> TensorDataset | None:
    prefix = "train" if train else "t10k"
    images = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    x = torch.from_numpy(_read_idx(images).copy()).float().div_(255.0).unsqueeze(1)
    x = (x - mean[0]) / std[0]
    y = torch.from_numpy(_read_idx(labels).astype(np.int64))
    return TensorDataset(x, y)


class AugmentedTensors(Dataset):
    """CIFAR-style augmentation of an in-memory image dataset: random crop with ``padding`` pixels of
    ``fill`` (the normalised value of black) on each side, and a random horizontal flip."""

    def __init__(self, dataset: Dataset, padding: int = 4, fill: float = 0.0, flip: bool = True) -> None:
        self.dataset, self.padding, self.fill, self.flip = dataset, padding, fill, flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        x, y = self.dataset[index]
        p = self.padding
        if p:
            h, w = x.shape[-2:]
            padded = torch.nn.functional.pad(x, (p, p, p, p), value=self.fill)
            i, j = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            x = padded[..., i : i + h, j : j + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, y


def load_dataset(
    name: str = "fashion_mnist",
    train: bool = True,
    data_path: str | None = None,
    subset: int | None = None,
    download: bool = False,
    augment: bool = False,
    seed: int = 0,
) -> Dataset:
    """A normalised classification dataset yielding ``(image (C, H, W) float, label int)``.

    Args:
        name: one of :data:`DATASETS`.
        data_path: folder with the data (torchvision layout or raw IDX files).
        subset: keep a seeded random subset of this many samples.
        download: let torchvision download into ``data_path`` when the files are missing.
        augment: random crop (pad 4) and horizontal flip (training set only), CIFAR-style; also applied to
            the in-memory Fashion-MNIST/MNIST data.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    tv_name, _, mean, std = DATASETS[name]
    dataset: Dataset | None = None
    if name == "fashion_mnist":
        for root in ([Path(data_path)] if data_path else []) + [DEBIAN_FASHION_MNIST]:
            if root.exists():
                dataset = _idx_dataset(root, train, mean, std)
            if dataset is not None:
                break
        if dataset is not None and augment and train:
            dataset = AugmentedTensors(dataset, padding=4, fill=-mean[0] / std[0])
    if dataset is None:
        import torchvision
        from torchvision import transforms as T

        if data_path is None:
            raise FileNotFoundError(
                f"{name}: no data found. Install Debian's dataset-fashion-mnist (Fashion-MNIST) or pass "
                "--data-path to a folder with the dataset (add --download to let torchvision fetch it)."
            )
        size = 32 if name.startswith("cifar") else 28
        steps = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] if augment and train else []
        transform = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
        dataset = getattr(torchvision.datasets, tv_name)(
            os.fspath(data_path), train=train, transform=transform, download=download
        )
    if subset is not None and subset < len(dataset):
        idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:subset]
        dataset = Subset(dataset, idx.tolist())
    return dataset


def dataset_info(name: str) -> Tuple[int, int]:
    """``(in_chans, num_classes)`` of a dataset in :data:`DATASETS`."""
    return DATASETS[name][1], 100 if name == "cifar100" else 10
