"""Quickstart: train a CIFAR ResNet20 on Fashion-MNIST with a Filter Skeleton, prune its stripes.

    python examples/quickstart.py                 # about 1-2 minutes on 2 CPU cores
    python examples/quickstart.py --model vgg16_bn --width 0.25 --sr 5e-3

Prints accuracy, MACs and params (with stripe indexes) before and after ``pruner.step()`` and checks that
pruning did not change the model's outputs.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

import swp_plugin
from swp_plugin import StripePruner, count_ops_and_params
from swp_plugin.models import create_model
from swp_plugin.recipes.data import dataset_info, load_dataset
from swp_plugin.recipes.training import evaluate, train_epoch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="vgg16_bn, resnet56, resnet20 or a timm model name")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (paper nets only)")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-path", default=None)
    p.add_argument("--subset", type=int, default=12000, help="training images used")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--sr", type=float, default=7e-3, help="L1 strength on the Filter Skeleton")
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    in_chans, num_classes = dataset_info(args.dataset)
    train = load_dataset(args.dataset, True, args.data_path, subset=args.subset, seed=args.seed)
    test = load_dataset(args.dataset, False, args.data_path, subset=5000, seed=args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test, batch_size=256)
    model = create_model(args.model, num_classes=num_classes, in_chans=in_chans, width=args.width)
    example = next(iter(test_loader))[0][:1]

    pruner = StripePruner(model, example, sr=args.sr, threshold=args.threshold,
                          ignored_layers=[model.get_classifier()])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * len(train_loader))
    start = time.time()
    for epoch in range(args.epochs):
        loss = train_epoch(model, train_loader, optimizer, after_backward=lambda: pruner.regularize(model),
                           scheduler=scheduler, desc=f"epoch {epoch + 1}")
        print(f"epoch {epoch + 1}: loss {loss:.3f}, dead stripes {100 * pruner.stripe_sparsity():.1f}%")

    acc_before = evaluate(model, test_loader)
    macs_before, params_before = count_ops_and_params(model, example)
    model.eval()
    probe = next(iter(test_loader))[0][:64]
    with torch.no_grad():
        y_before = model(probe)
    pruner.step()
    with torch.no_grad():
        y_after = model(probe)
    acc_after = evaluate(model, test_loader)
    macs_after, params_after = count_ops_and_params(model, example)
    err = float((y_before - y_after).abs().max() / y_before.abs().max())
    deployed = swp_plugin.deploy(model, example)  # BN folded, per layer the faster of the stripe kernel and dense
    with torch.no_grad():
        err_deployed = float((y_before - deployed(probe)).abs().max() / y_before.abs().max())

    print(f"\ntrained {args.epochs} epochs in {time.time() - start:.0f}s")
    print(f"{'':14}{'accuracy':>10}{'MACs (M)':>12}{'params (M)':>12}")
    print(f"{'before step()':14}{acc_before:>10.2f}{macs_before / 1e6:>12.2f}{params_before / 1e6:>12.3f}")
    print(f"{'after step()':14}{acc_after:>10.2f}{macs_after / 1e6:>12.2f}{params_after / 1e6:>12.3f}")
    print(f"max|y_pruned - y_dense| / max|y_dense| = {err:.2e}  (exactness)")
    print(f"deployed: {deployed.deploy_report.summary()}; max|y_deployed - y_dense| / max|y_dense| = "
          f"{err_deployed:.2e}")


if __name__ == "__main__":
    main()
