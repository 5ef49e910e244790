"""A small training/evaluation loop shared by the examples, tests and benchmarks."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    after_backward: Callable[[], None] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    device: str = "cpu",
    desc: str = "train",
    progress: bool = True,
) -> float:
    """One epoch of cross-entropy training; ``after_backward`` runs between backward and step
    (``pruner.regularize``); ``scheduler`` steps after every optimizer step. Returns the mean loss."""
    model.train()
    total, count = 0.0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * len(y)
        count += len(y)
    return total / max(1, count)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str = "cpu", progress: bool = False) -> float:
    """Top-1 accuracy in percent (eval mode)."""
    model.eval()
    correct, count = 0, 0
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress):
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        count += len(y)
    return 100.0 * correct / max(1, count)
