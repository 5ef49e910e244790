"""A short real training run on Fashion-MNIST: a large sr kills stripes, pruning is exact on real images."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from swp_plugin import StripePruner, count_ops_and_params
from swp_plugin.models import resnet20
from swp_plugin.recipes.data import DEBIAN_FASHION_MNIST, load_dataset
from swp_plugin.recipes.training import evaluate, train_epoch

pytestmark = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist (make setup installs it)"
)


def test_fashion_mnist_training_kills_stripes_and_pruning_is_exact():
    torch.manual_seed(0)
    train = DataLoader(load_dataset("fashion_mnist", True, subset=4000), batch_size=64, shuffle=True)
    test = DataLoader(load_dataset("fashion_mnist", False, subset=1000), batch_size=500)
    model = resnet20(num_classes=10, in_chans=1, width=0.5)
    images = next(iter(test))[0]
    pruner = StripePruner(model, images[:2], sr=3e-2, threshold=0.05, ignored_layers=[model.fc])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 3 * len(train))
    sparsity = [pruner.stripe_sparsity()]
    for _ in range(3):
        train_epoch(model, train, optimizer, lambda: pruner.regularize(model), scheduler, progress=False)
        sparsity.append(pruner.stripe_sparsity())
    assert sparsity[0] == 0 and sparsity[-1] > 0.1 and sparsity == sorted(sparsity)

    acc_dense = evaluate(model, test)
    macs_dense, _ = count_ops_and_params(model, images[:1])
    model.eval()
    with torch.no_grad():
        logits_dense = model(images)
    pruner.step()
    with torch.no_grad():
        logits = model(images)
    acc = evaluate(model, test)
    macs, _ = count_ops_and_params(model, images[:1])
    print(f"stripe sparsity {sparsity}, accuracy {acc_dense:.1f} -> {acc:.1f}, MACs {macs_dense:.3g} -> {macs:.3g}")
    assert float((logits - logits_dense).abs().max() / logits_dense.abs().max()) <= 1e-4
    assert acc == acc_dense and macs < macs_dense
