"""A small training/evaluation loop shared by the examples, tests and benchmarks."""

from __future__ import annotations

import math
from typing import Callable, List, Sequence

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
    after_step: Callable[[], None] | None = None,
    criterion: Callable[..., torch.Tensor] | None = None,
) -> float:
    """One epoch of training on ``criterion(model(x), y)`` (default cross-entropy); ``after_backward`` runs
    between backward and step (``pruner.regularize``), ``after_step`` after each optimizer step; ``scheduler``
    steps after every optimizer step. Returns the mean loss."""
    criterion = F.cross_entropy if criterion is None else criterion
    model.train()
    total, count = 0.0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = x.to(device), y.to(device)
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if after_step is not None:
            after_step()
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


#: learning-rate schedules of :func:`make_scheduler` (stepped once per optimizer step)
SCHEDULES = ("cosine", "step", "constant")


def make_optimizer(
    model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4
) -> torch.optim.Optimizer:
    """SGD with momentum over ``model.parameters()`` (build it after any pruner that adds
    parameters, and again after ``pruner.step()``, which replaces them)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _step_milestones(total_steps: int, milestones: Sequence[float]) -> List[int]:
    return [max(1, int(round(m * total_steps))) for m in milestones]


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    schedule: str = "cosine",
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-step schedule over ``total_steps``: ``cosine`` (annealed to 0), ``step`` (times ``gamma`` at
    the fractions ``milestones`` of training, the paper's /10 at 50% and 75%) or ``constant`` (None)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total_steps))
    if schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, _step_milestones(total_steps, milestones), gamma)
    if schedule == "constant":
        return None
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def lr_sum(
    lr: float,
    total_steps: int,
    schedule: str = "cosine",
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> float:
    """Sum of the learning rates of the ``total_steps`` optimizer steps of :func:`make_scheduler`'s schedule.

    With SGD momentum ``m`` a constant gradient ``g`` moves a parameter by about ``g * lr_sum / (1 - m)``
    over the schedule: the total L1 "push" of a regulariser of strength ``g``.
    """
    if schedule == "cosine":
        return sum(lr * (1 + math.cos(math.pi * t / total_steps)) / 2 for t in range(total_steps))
    if schedule == "step":
        marks = _step_milestones(total_steps, milestones)
        return sum(lr * gamma ** sum(t >= m for m in marks) for t in range(total_steps))
    if schedule == "constant":
        return lr * total_steps
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def fit(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    lr: float,
    schedule: str = "cosine",
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    after_backward: Callable[[], None] | None = None,
    after_epoch: Callable[[int, float], None] | None = None,
    device: str = "cpu",
    desc: str = "train",
    progress: bool = True,
    after_step: Callable[[torch.optim.Optimizer], None] | None = None,
    criterion: Callable[..., torch.Tensor] | None = None,
) -> List[float]:
    """``epochs`` epochs of SGD (a fresh optimizer and per-step schedule, see :func:`make_scheduler`) on
    ``criterion(model(x), y)`` (default cross-entropy; e.g. a model with auxiliary outputs and its loss).

    ``after_backward`` runs between backward and the optimizer step (``pruner.regularize``);
    ``after_step(optimizer)`` after each optimizer step; ``after_epoch(epoch, loss)`` after each epoch.
    Returns the mean loss of each epoch.
    """
    if epochs <= 0:
        return []
    optimizer = make_optimizer(model, lr, momentum, weight_decay)
    scheduler = make_scheduler(optimizer, epochs * len(loader), schedule)
    losses = []
    for epoch in range(epochs):
        loss = train_epoch(model, loader, optimizer, after_backward=after_backward, scheduler=scheduler,
                           device=device, desc=f"{desc} {epoch + 1}/{epochs}", progress=progress,
                           after_step=(lambda: after_step(optimizer)) if after_step is not None else None,
                           criterion=criterion)
        losses.append(loss)
        if after_epoch is not None:
            after_epoch(epoch, loss)
    return losses
