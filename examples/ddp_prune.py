"""Stripe-Wise Pruning with PyTorch's DistributedDataParallel (DDP): several processes, one model.

    torchrun --nproc_per_node 2 examples/ddp_prune.py                  # CPU (gloo), Fashion-MNIST
    torchrun --nproc_per_node 8 examples/ddp_prune.py --device cuda    # one GPU per process (nccl)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29400 examples/ddp_prune.py --device cuda

What each rank does (the lines marked ``DDP:`` are what differs from ``examples/quickstart.py``):

1. build the model and the ``StripePruner`` on the bare model, then wrap it in DDP: DDP registers the parameters
   it all-reduces when it is built, and the Filter Skeletons are parameters the pruner adds;
2. train on its shard of the data; ``pruner.regularize`` runs after ``backward()``, i.e. after DDP's gradient
   all-reduce, and is deterministic, so every rank kills the same stripes and masks the same channels;
3. broadcast rank 0's buffers (BatchNorm statistics: each rank updates them with its own batches), then
   ``pruner.step()`` on every rank: the same pruned model everywhere (checked and printed);
4. filters scaled back up (``restore_filter_norms``, exact, as in ``examples/continual_prune.py``), a new DDP wrapper
   and a new optimizer (``step()`` replaced the parameters), fine-tune;
5. rank 0 saves with ``swp_plugin.save``; every rank loads the file into a fresh model (checked).

``--batch-size`` is the global batch (split over the ranks), so ``sr`` acts as in a single process with that batch.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset

import swp_plugin
from swp_plugin import StripePruner, count_ops_and_params
from swp_plugin.models import create_model
from swp_plugin.recipes.continual import filter_norm_rms, restore_filter_norms
from swp_plugin.recipes.data import dataset_info, load_dataset
from swp_plugin.recipes.training import train_epoch


def evaluate(model: torch.nn.Module, dataset, device: torch.device) -> float:
    """Top-1 accuracy (%) over the whole ``dataset``: each rank scores every ``world``-th sample, then all-reduce."""
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=256)
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in loader:
            counts += torch.tensor([(model(x.to(device)).argmax(1) == y.to(device)).sum().item(), len(y)],
                                   dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    return float(100 * counts[0] / counts[1])


def fingerprint(model: torch.nn.Module, bn_stats: bool = True) -> str:
    """A hash of the model's tensors (names, shapes, bytes); ``bn_stats=False``: without BatchNorm statistics."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        if not bn_stats and name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def same_on_all_ranks(value) -> bool:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return all(v == gathered[0] for v in gathered)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics, stripe and channel masks) on every rank, as DDP does at each forward."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="vgg16_bn, resnet56, resnet20 or a timm model name")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (paper nets only)")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-path", default=None)
    p.add_argument("--subset", type=int, default=12000, help="training images (all ranks together)")
    p.add_argument("--test-subset", type=int, default=5000, help="test images")
    p.add_argument("--epochs", type=int, default=3, help="epochs with the Filter Skeleton")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over the ranks")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--lr-finetune", type=float, default=0.01)
    p.add_argument("--sr", type=float, default=7e-3, help="L1 strength on the Filter Skeleton")
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: GPU LOCAL_RANK, nccl")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / ranks)")
    p.add_argument("--out", default="runs/ddp_prune/pruned.pt", help="where rank 0 saves the pruned model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)  # a plain `python examples/ddp_prune.py` runs as one rank
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                                             world))))
    log = print if rank == 0 else (lambda *a, **k: None)
    start = time.time()

    in_chans, num_classes = dataset_info(args.dataset)
    train = load_dataset(args.dataset, True, args.data_path, subset=args.subset, seed=args.seed)
    test = load_dataset(args.dataset, False, args.data_path, subset=args.test_subset, seed=args.seed)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train, batch_size=max(1, args.batch_size // world), sampler=sampler, drop_last=True)
    example = test[0][0][None].to(device)  # the same on every rank

    torch.manual_seed(args.seed)
    model = create_model(args.model, num_classes=num_classes, in_chans=in_chans, width=args.width).to(device)
    norms = filter_norm_rms(model)  # for fine-tuning after step(): see restore_filter_norms
    pruner = StripePruner(model, example, sr=args.sr, threshold=args.threshold,
                          ignored_layers=[model.get_classifier()])
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)  # DDP: after the pruner
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * len(loader))
    log(f"{world} rank(s), {torch.get_num_threads()} thread(s) each, {len(loader)} steps per epoch, "
        f"global batch {len(loader) and loader.batch_size * world}")
    masks_agree = True
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        loss = train_epoch(ddp, loader, optimizer, after_backward=lambda: pruner.regularize(ddp),
                           scheduler=scheduler, device=device, progress=False)
        loss = torch.tensor(loss, device=device)
        dist.all_reduce(loss)
        masks_agree &= same_on_all_ranks(fingerprint(model, bn_stats=False))  # skeletons, masks, weights
        log(f"epoch {epoch + 1}: loss {float(loss) / world:.3f}, dead stripes {100 * pruner.stripe_sparsity():.1f}%")

    broadcast_buffers(model)  # DDP: rank 0's BatchNorm statistics everywhere, so every step() sees the same model
    acc_dense = evaluate(model, test, device)
    macs_dense, params_dense = count_ops_and_params(model, example)
    probe = torch.stack([test[i][0] for i in range(64)]).to(device)
    model.eval()
    with torch.no_grad():
        y_dense = model(probe)
        pruner.step()  # DDP: on every rank
        y_pruned = model(probe)
    exactness = float((y_dense - y_pruned).abs().max() / y_dense.abs().max())
    pruned_agree = same_on_all_ranks(fingerprint(model))
    acc_pruned = evaluate(model, test, device)
    macs, params = count_ops_and_params(model, example)

    restore_filter_norms(model, example, norms)  # filters the L1 push shrank scaled back up, exactly (every rank)
    # DDP: step() replaced the parameters, so a new wrapper and a new optimizer
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr_finetune, momentum=0.9, weight_decay=1e-4)
    for epoch in range(args.finetune_epochs):
        sampler.set_epoch(args.epochs + epoch)
        train_epoch(ddp, loader, optimizer, device=device, progress=False)
    broadcast_buffers(model)
    acc_tuned = evaluate(model, test, device)

    if rank == 0:  # DDP: one writer
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        swp_plugin.save(model, args.out)
    dist.barrier()
    torch.manual_seed(args.seed)
    fresh = create_model(args.model, num_classes=num_classes, in_chans=in_chans, width=args.width)
    loaded = swp_plugin.load(args.out, fresh)
    loaded.to(device).eval()
    model.eval()
    with torch.no_grad():
        load_err = float((loaded(probe) - model(probe)).abs().max() / model(probe).abs().max())
    load_err_max = torch.tensor(load_err, device=device)
    dist.all_reduce(load_err_max, op=dist.ReduceOp.MAX)

    log(f"\n{args.model} on {args.dataset}, {world} rank(s), {time.time() - start:.0f} s")
    log(f"{'':22}{'acc (%)':>9}{'MACs (M)':>10}{'params (M)':>12}")
    log(f"{'dense, before step()':22}{acc_dense:>9.2f}{macs_dense / 1e6:>10.2f}{params_dense / 1e6:>12.3f}")
    log(f"{'after step()':22}{acc_pruned:>9.2f}{macs / 1e6:>10.2f}{params / 1e6:>12.3f}")
    log(f"{'fine-tuned':22}{acc_tuned:>9.2f}{macs / 1e6:>10.2f}{params / 1e6:>12.3f}")
    log(f"exactness of step(): max|y_pruned - y_dense| / max|y_dense| = {exactness:.2e} (rank 0)")
    log(f"skeletons, masks and weights equal on every rank after every epoch: {masks_agree}; "
        f"the same pruned model on every rank after step(): {pruned_agree}")
    log(f"saved by rank 0 to {args.out}; loaded on every rank, max relative difference {float(load_err_max):.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
