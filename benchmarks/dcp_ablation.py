"""Do DCP's parts matter? One-shot channel selection of DCP's last stage on a trained baseline, no fine-tuning.

    python examples/continual_prune.py --model vgg19_bn --first dcp --out runs/table3/vgg19_dcp   # writes the baseline
    python benchmarks/dcp_ablation.py --baseline runs/table3/vgg19_dcp/baseline.pt \
        --json benchmarks/results/dcp_ablation.json

The last of ``P + 1`` stages (its layers' loss is the final one, so no auxiliary head has to be trained) loses
``--ratio`` of each layer's input channels, chosen by: DCP as in the example (``swp_plugin.recipes.dcp``), DCP
without the weight refinement, DCP with ``lam = 0`` (reconstruction only), DCP with the CPU simplifications
relaxed (more refinement steps, smaller greedy steps), the L1 norm of each input channel's weights, and at
random. Prints the test accuracy right after removal.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import time

import torch
from torch.utils.data import DataLoader

from swp_plugin import count_ops_and_params
from swp_plugin.recipes.continual import classifier_of, load_pruned_checkpoint
from swp_plugin.recipes.data import load_dataset
from swp_plugin.recipes.dcp import DCPPruner
from swp_plugin.recipes.training import evaluate

VARIANTS = {
    "DCP (example's settings)": {},
    "DCP, no refinement of W_A (opt_steps=0)": {"opt_steps": 0},
    "DCP, lam=0 (reconstruction only)": {"lam": 0.0},
    "DCP, 20 refinement steps per addition": {"opt_steps": 20},
    "DCP, 8 greedy additions per layer": {"greedy_steps": 8},
}


def _by_score(pruner: DCPPruner, stage: int, score) -> None:
    """Keep each layer's highest-scoring input channels (``score(layer) -> (C_in,)``), no refinement."""
    for layer in pruner.stages[stage]:
        selected = score(layer).topk(pruner.kept_channels(layer)).indices.tolist()
        with torch.no_grad():
            layer.weight[:, sorted(set(range(layer.in_channels)) - set(selected))] = 0
        pruner.remove_unselected(layer, selected)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="a trained model saved by examples/continual_prune.py")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of each layer's input channels removed")
    p.add_argument("--aux", type=int, default=2, help="auxiliary losses (the last of aux + 1 stages is pruned)")
    p.add_argument("--batches", type=int, default=4, help="training batches of 64 for the selection")
    p.add_argument("--subset", type=int, default=20000, help="training images the batches are drawn from")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    baseline = load_pruned_checkpoint(args.baseline)
    train = DataLoader(load_dataset("fashion_mnist", True, subset=args.subset, seed=args.seed), batch_size=64,
                       shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    test = DataLoader(load_dataset("fashion_mnist", False), batch_size=256)
    batches = list(itertools.islice(train, args.batches))
    example = batches[0][0][:1]
    rows = [{"method": "baseline (not pruned)", "accuracy": evaluate(baseline, test),
             "macs": int(count_ops_and_params(baseline, example)[0])}]
    generator = torch.Generator().manual_seed(args.seed)
    scorers = {
        "L1 norm of the input channel's weights": lambda layer: layer.weight.detach().abs().sum((0, 2, 3)),
        "random": lambda layer: torch.rand(layer.in_channels, generator=generator),
    }
    for method in [*VARIANTS, *scorers]:
        model = copy.deepcopy(baseline)
        pruner = DCPPruner(model, example, pruning_ratio=args.ratio, num_aux=args.aux,
                           ignored_layers=[classifier_of(model)], **VARIANTS.get(method, {}))
        stage = pruner.num_stages - 1
        begin = time.process_time()
        if method in VARIANTS:
            pruner.prune_stage(stage, batches)
        else:
            _by_score(pruner, stage, scorers[method])
        cpu = round(time.process_time() - begin, 1)
        rows.append({"method": method, "accuracy": evaluate(model, test), "cpu_seconds": cpu,
                     "macs": int(count_ops_and_params(model, example)[0]),
                     "layers": [pruner.names[m] for m in pruner.stages[stage]]})
        print(f"{method:<45} {rows[-1]['accuracy']:6.2f}%  {rows[-1]['macs'] / 1e6:.2f}M MACs  "
              f"{rows[-1]['cpu_seconds']:.1f} CPU s", flush=True)
    result = {"rows": rows, "args": vars(args)}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
