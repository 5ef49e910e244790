"""DistributedDataParallel with Filter Skeletons: 2 processes, gloo on CPU, started the way torchrun starts them.

One scenario (a CIFAR ResNet20, different data on each rank), every check compares the ranks bit for bit:

* the ranks start apart (different skeleton values, different dead stripes and channel masks): the DDP
  constructor's broadcast from rank 0 makes every parameter and buffer equal;
* after every training step (forward through DDP, backward = gradient all-reduce, ``regularize``, optimizer
  step) the skeletons, ``alive`` stripe masks, BatchNorm channel masks and weights are equal on every rank;
* BatchNorm running statistics are not (each rank updates them with its own batch after DDP's broadcast);
  after broadcasting the buffers, ``step()`` on every rank gives the same structure, tensors and outputs;
* a new DDP wrapper and optimizer train the pruned model on; a rank-0 ``swp_plugin.save`` loads on every rank
  (its tensors bit for bit, its outputs to float32 rounding);
* ``StripePruner`` on a DDP wrapper is refused with a clear error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import swp_plugin
from swp_plugin import StripeConv2d, StripePruner
from swp_plugin.models import resnet20
from swp_plugin.persistence import describe
from swp_plugin.testing import randomize_skeletons, regularized_step, rel_err

WORLD = 2
STEPS = 4
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return resnet20(in_chans=1, width=0.25)  # 4/8/16 channels, residual adds couple the channels


def _batch(seed: int, n: int = 8):
    """``(x (n, 1, 16, 16), y (n,))``, a different batch for every seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _state(model: nn.Module, bn_stats: bool = True) -> Dict[str, torch.Tensor]:
    """Parameters and buffers (skeletons, ``alive`` masks, channel masks, weights), optionally without BN stats."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if bn_stats or not k.endswith(BN_STATS)}


def _differing(state: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the tensors that are not bitwise equal on every rank."""
    gathered: List = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return sorted(k for k in state if any(not torch.equal(g[k], gathered[0][k]) for g in gathered[1:]))


def _train(ddp: DDP, optimizer, rank: int, steps: int, pruner=None, first: int = 0) -> List[dict]:
    """``steps`` DDP steps on this rank's own data; after each, what differs between the ranks."""
    log = []
    for i in range(first, first + steps):
        x, y = _batch(1000 * rank + i)
        ddp.train()
        loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()  # DDP all-reduces the gradients here
        if pruner is not None:
            pruner.regularize(ddp)
        optimizer.step()
        log.append({"loss": float(loss.detach()), "sparsity": pruner.stripe_sparsity() if pruner else None,
                    "differ": _differing(_state(ddp.module, bn_stats=False))})
    return log


def _scenario(rank: int, tmp: Path) -> dict:
    out: dict = {}
    example = _batch(0, n=1)[0]
    model = _net()
    pruner = StripePruner(model, example, sr=0.5, threshold=0.05, ignored_layers=[model.get_classifier()])
    # The ranks start apart: different skeleton values, and one local (not distributed) step on this rank's data
    # kills different stripes and masks different BatchNorm channels.
    randomize_skeletons(pruner, dead_stripes=0.3, dead_filters=0.2, seed=rank)
    regularized_step(model, pruner, _batch(500 + rank)[0])
    out["differ_before_wrap"] = _differing(_state(model))
    ddp = DDP(model)  # after the pruner: the skeletons are among the parameters DDP registers
    out["differ_after_wrap"] = _differing(_state(model))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    out["train"] = _train(ddp, optimizer, rank, STEPS, pruner)
    out["bn_stats_differ"] = _differing({k: v for k, v in _state(model).items() if k.endswith(BN_STATS)})

    for buffer in model.buffers():  # BatchNorm statistics of rank 0 everywhere, as DDP's next forward would do
        dist.broadcast(buffer, src=0)
    probe = _batch(7)[0]
    model.eval()
    with torch.no_grad():
        before = model(probe)
        channels = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
        pruner.step()  # every rank
        after = model(probe)
    out["rel_err"] = rel_err(before, after)
    out["stripe_convs"] = sum(isinstance(m, StripeConv2d) for m in model.modules())
    out["channels"] = [channels, sum(m.out_channels for m in model.modules() if isinstance(m, (nn.Conv2d,
                                                                                                StripeConv2d)))]
    structures: List = [None] * WORLD
    dist.all_gather_object(structures, describe(model))
    out["same_structure"] = all(s == structures[0] for s in structures)
    out["differ_after_step"] = _differing(_state(model))
    out["outputs_differ"] = _differing({"y": after})

    ddp = DDP(model)  # the parameters were replaced: a new wrapper and a new optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    out["finetune"] = _train(ddp, optimizer, rank, 2, first=STEPS)

    path = tmp / "pruned.pt"
    if rank == 0:
        swp_plugin.save(model, path)
    dist.barrier()
    loaded = swp_plugin.load(path, _net()).eval()
    model.eval()
    with torch.no_grad():
        y_loaded, y_own = loaded(probe), model(probe)
    outputs: List = [None] * WORLD
    dist.all_gather_object(outputs, (y_own, _state(model), describe(model)))
    y_rank0, state_rank0, structure_rank0 = outputs[0]
    loaded_state = _state(loaded)
    # the file's tensors bit for bit; the outputs to float32 rounding only: a freshly loaded tensor may sit at
    # another alignment, and BLAS kernels may then add in another order (seen here as a 2e-9 difference)
    out["loaded_equals_rank0"] = (describe(loaded) == structure_rank0 and loaded_state.keys() == state_rank0.keys()
                                  and all(torch.equal(v, state_rank0[k]) for k, v in loaded_state.items()))
    out["loaded_rel_err"] = rel_err(y_rank0, y_loaded)

    try:
        StripePruner(DDP(_net()), example)
        out["pruner_on_wrapper"] = "no error"
    except ValueError as err:
        out["pruner_on_wrapper"] = str(err)
    return out


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ["SWP_STRIPE_BACKEND"] = "stripe"  # the same kernel on every rank: outputs compared bit for bit
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        result = _scenario(rank, Path(tmp))
    finally:
        dist.destroy_process_group()
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(result))


def test_ddp_two_processes_keep_skeletons_masks_and_pruned_model_identical(tmp_path):
    # fork where there is one: the children start with torch and swp_plugin already imported (a few seconds in
    # all, not 20 on a busy 2-core machine); each sets up its own process group from scratch, as under torchrun.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=True, start_method=method)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    r = ranks[0]
    # started apart (skeletons, masks, weights), DDP's broadcast wins
    assert any("skeleton" in k for k in r["differ_before_wrap"]) and any("alive" in k for k in r["differ_before_wrap"])
    assert any(k.endswith(".mask") for k in r["differ_before_wrap"])
    assert r["differ_after_wrap"] == []
    # different data per rank, stripes dying during training, everything but BN statistics equal after every step
    losses = [[step["loss"] for step in rank["train"]] for rank in ranks]
    assert all(a != b for a, b in zip(*losses))
    sparsity = [step["sparsity"] for step in r["train"]]
    assert sparsity[-1] > sparsity[0] > 0
    assert all(step["differ"] == [] for rank in ranks for step in rank["train"])
    assert r["bn_stats_differ"]  # why the buffers are broadcast before step()
    # step() on every rank: exact, pruned, the same model everywhere
    assert all(rank["rel_err"] <= 1e-4 for rank in ranks)
    assert r["stripe_convs"] > 0 and r["channels"][1] < r["channels"][0]
    assert r["same_structure"] and r["differ_after_step"] == [] and r["outputs_differ"] == []
    # a new DDP wrapper trains the pruned model on, in step; rank 0's file loads everywhere
    assert all(step["differ"] == [] for rank in ranks for step in rank["finetune"])
    assert all(rank["loaded_equals_rank0"] for rank in ranks)
    assert all(rank["loaded_rel_err"] <= 1e-6 for rank in ranks)
    assert all("build the pruner on the bare model" in rank["pruner_on_wrapper"] for rank in ranks)


@pytest.mark.slow
@pytest.mark.needs_data
def test_example_under_torchrun(tmp_path):
    """examples/ddp_prune.py with torchrun, 2 processes, a tiny budget (20-60 s on 2 cores)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_prune.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(example), "--subset", "512", "--test-subset", "256", "--width", "0.25", "--sr", "2",
           "--epochs", "1", "--finetune-epochs", "1", "--out", str(tmp_path / "pruned.pt")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "equal on every rank after every epoch: True; the same pruned model on every rank after step(): True" in out
    assert float(re.search(r"max\|y_dense\| = (\S+)", out).group(1)) <= 1e-4
    dense, pruned = (float(re.search(re.escape(row) + r"\s+\S+\s+(\S+)", out).group(1))
                     for row in ("dense, before step()", "after step()"))
    assert pruned < dense  # --sr 2 kills stripes within the 8 steps
    assert float(re.search(r"max relative difference (\S+)", out).group(1)) <= 1e-5
    # the file rank 0 wrote, loaded in this process (rank 1 loaded it too, inside the example)
    import swp_plugin
    from swp_plugin.models import create_model

    loaded = swp_plugin.load(tmp_path / "pruned.pt", create_model("resnet20", num_classes=10, in_chans=1, width=0.25))
    macs, _ = swp_plugin.count_ops_and_params(loaded.eval(), torch.randn(1, 1, 28, 28))
    tuned = float(re.search(re.escape("fine-tuned") + r"\s+\S+\s+(\S+)", out).group(1))
    assert abs(macs / 1e6 - tuned) < 0.01 and macs / 1e6 < dense
