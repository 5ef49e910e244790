"""The stage runner shared by ``examples/continual_prune.py`` and ``benchmarks/granularity.py``.

One object holds what every stage of those pipelines needs: the data loaders, the device, the training
schedule (SGD momentum 0.9, per-step ``cosine`` / ``step`` / ``constant`` schedule), evaluation, MACs/params
counting on one example image, and a clock for the stage being run.
"""

from __future__ import annotations

import time
from typing import Callable, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..measure import count_ops_and_params
from .data import dataset_info, load_dataset
from .training import evaluate, fit


class StageRunner:
    """Data, training and measurement for pipelines of train -> prune -> fine-tune stages.

    Args:
        dataset, data_path, download: see :func:`swp_plugin.recipes.data.load_dataset`.
        subset, test_subset: training / test images used (``None`` or 0: all).
        batch_size: training batch; the test loader uses ``test_batch``.
        augment: random crop + flip on the training set.
        schedule, weight_decay: of every :meth:`train` call (SGD momentum 0.9).
        example_batch: images in :attr:`latency_input` (test images); :attr:`example` is its first image on
            ``device`` ``(1, C, H, W)``, for tracing and counting.
        seed: data subset and shuffling.
    """

    def __init__(self, dataset: str = "fashion_mnist", data_path: str | None = None, subset: int | None = None,
                 test_subset: int | None = None, batch_size: int = 64, test_batch: int = 256, augment: bool = False,
                 download: bool = False, schedule: str = "cosine", weight_decay: float = 1e-4, device: str = "cpu",
                 workers: int = 0, example_batch: int = 1, seed: int = 0, progress: bool = True) -> None:
        self.device, self.schedule, self.weight_decay, self.progress = device, schedule, weight_decay, progress
        self.in_chans, self.num_classes = dataset_info(dataset)
        self.train_set = load_dataset(dataset, True, data_path, subset=subset or None, download=download,
                                      augment=augment, seed=seed)
        self.test_set = load_dataset(dataset, False, data_path, subset=test_subset or None, download=download,
                                     seed=seed)
        gen = torch.Generator().manual_seed(seed)
        self.train_loader = DataLoader(self.train_set, batch_size=batch_size, shuffle=True, generator=gen,
                                       num_workers=workers, drop_last=len(self.train_set) > batch_size)
        self.test_loader = DataLoader(self.test_set, batch_size=test_batch, num_workers=workers)
        self.latency_input = next(iter(DataLoader(self.test_set, batch_size=max(1, example_batch))))[0]
        self.example = self.latency_input[:1].to(device)
        self._wall, self._cpu = time.time(), time.process_time()

    def describe(self, dataset: str) -> str:
        return (f"data: {dataset}, {len(self.train_set)} training / {len(self.test_set)} test images; "
                f"device {self.device}, {torch.get_num_threads()} threads")

    def steps(self, epochs: int) -> int:
        """Optimizer steps of ``epochs`` epochs."""
        return epochs * len(self.train_loader)

    def train(self, model: nn.Module, epochs: int, lr: float, desc: str, after_backward: Callable | None = None,
              after_step: Callable | None = None, after_epoch: Callable | None = None, log: bool = False,
              criterion: Callable | None = None):
        """``epochs`` epochs of SGD at ``lr`` with the runner's schedule (see :func:`~.training.fit`, also for
        ``criterion``); ``log`` prints each epoch's loss."""
        def epoch_done(epoch: int, loss: float) -> None:
            if log:
                print(f"  {desc} epoch {epoch + 1}/{epochs}: loss {loss:.3f}", flush=True)
            if after_epoch is not None:
                after_epoch(epoch, loss)

        return fit(model, self.train_loader, epochs, lr, schedule=self.schedule, weight_decay=self.weight_decay,
                   after_backward=after_backward, after_epoch=epoch_done, after_step=after_step, device=self.device,
                   desc=desc, progress=self.progress, criterion=criterion)

    def accuracy(self, model: nn.Module) -> float:
        """Top-1 test accuracy (%)."""
        return evaluate(model, self.test_loader, device=self.device, progress=self.progress)

    def counts(self, model: nn.Module) -> Tuple[int, int]:
        """``(MACs, params)`` for one example image; params include stripe indexes."""
        macs, params = count_ops_and_params(model, self.example)
        return int(macs), int(params)

    def start(self) -> None:
        """Start the stage clock (wall and CPU)."""
        self._wall, self._cpu = time.time(), time.process_time()

    def elapsed(self) -> Tuple[float, float]:
        """``(wall, CPU)`` seconds since :meth:`start`."""
        return time.time() - self._wall, time.process_time() - self._cpu
