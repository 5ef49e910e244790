"""Command line: ``swp prune`` / ``swp report`` (also ``python -m swp_plugin``).

    swp prune resnet50 --macs-reduction 0.5 --input-size 3 224 224 --out resnet50_swp.pt
    swp report resnet50_swp.pt --plot resnet50_swp.png

``prune`` without training data is a data-free start: the Filter Skeletons are untrained (all 1), so the
stripes are ranked by their weight magnitude - not the paper's method, which learns the skeleton while
training (use ``StripePruner`` in your training loop for that).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

import torch

from . import load, save
from .measure.counting import count_ops_and_params
from .measure.plots import plot_filter_shapes, plot_stripe_ratios
from .measure.report import report
from .models import create_model
from .persistence import read
from .pruning.pruner import StripePruner


def _prune(args: argparse.Namespace) -> None:
    in_chans = args.input_size[0]
    model = create_model(args.model, num_classes=args.num_classes, in_chans=in_chans)
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    model.eval()
    x = torch.randn(1, *args.input_size)
    macs0, params0 = count_ops_and_params(model, x)
    target = ({"macs_reduction": args.macs_reduction} if args.macs_reduction is not None
              else {"params_reduction": args.params_reduction})
    pruner = StripePruner(model, x, ignored_layers=[model.get_classifier()], **target)
    pruner.step()
    macs, params = count_ops_and_params(model, x)
    save(model, args.out, architecture=args.model, num_classes=args.num_classes, input_size=list(args.input_size))
    print(f"{args.model}: MACs {macs0 / 1e6:.1f}M -> {macs / 1e6:.1f}M ({1 - macs / macs0:.1%} less), "
          f"params {params0 / 1e6:.2f}M -> {params / 1e6:.2f}M; saved {args.out}")


def _report(args: argparse.Namespace) -> None:
    meta = read(args.file).get("metadata", {})
    if not meta.get("architecture"):
        raise ValueError(f"{args.file} has no model name in its metadata; `swp report` reads files written by "
                         "`swp prune` or examples/continual_prune.py (or swp_plugin.save(model, path, "
                         "architecture=..., num_classes=..., input_size=[C, H, W]))")
    model = create_model(meta["architecture"], num_classes=meta["num_classes"], in_chans=meta["input_size"][0],
                         **meta.get("model_kwargs", {}))
    model = load(args.file, model)
    report(model, torch.randn(1, *meta["input_size"]))
    if args.plot:
        plot_stripe_ratios(model, args.plot)
        shapes = Path(args.plot).with_name(Path(args.plot).stem + "_shapes.png")
        plot_filter_shapes(model, shapes)
        print(f"wrote {args.plot} and {shapes}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prune = sub.add_parser("prune", help="stripe-prune a timm model (or vgg16_bn/resnet56) to a MACs/params target")
    prune.add_argument("model", help="timm model name, or vgg16_bn / resnet56 / resnet20")
    goal = prune.add_mutually_exclusive_group(required=True)
    goal.add_argument("--macs-reduction", type=float, help="fraction of MACs to remove, e.g. 0.5")
    goal.add_argument("--params-reduction", type=float, help="fraction of params (with stripe indexes) to remove")
    prune.add_argument("--checkpoint", help="state_dict to load first (random init otherwise)")
    prune.add_argument("--input-size", type=int, nargs=3, default=[3, 224, 224], metavar=("C", "H", "W"))
    prune.add_argument("--num-classes", type=int, default=1000)
    prune.add_argument("--out", required=True, help="output file (swp_plugin.save format)")
    prune.set_defaults(run=_prune)
    rep = sub.add_parser("report", help="per-layer table of a file written by `swp prune`")
    rep.add_argument("file")
    rep.add_argument("--plot", help="PNG of remaining stripes per kernel position (+ *_shapes.png)")
    rep.set_defaults(run=_report)
    return parser


def main(argv: List[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        parser.exit(2, f"swp {args.command}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
