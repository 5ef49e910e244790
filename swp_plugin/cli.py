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

from .measure.counting import count_ops_and_params
from .measure.plots import plot_filter_shapes, plot_stripe_ratios
from .measure.report import report
from .models import create_model
from .persistence import check_writable, load, model_spec, read, save
from .pruning.pruner import StripePruner


def _progress(message: str) -> None:
    print(f"swp: {message}", file=sys.stderr, flush=True)


def _state_dict(path: str) -> dict:
    """The state dict of ``--checkpoint`` (``weights_only``: tensors only), or a ValueError naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"{path}: cannot be read as a state_dict with torch.load(weights_only=True) "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state_dict (a dict of tensors, or {{'state_dict': ...}})")
    return state


def _prune(args: argparse.Namespace) -> None:
    check_writable(args.out)  # before the work, not after it
    in_chans = args.input_size[0]
    _progress(f"building {args.model}")
    model = create_model(args.model, num_classes=args.num_classes, in_chans=in_chans)
    if args.checkpoint:
        try:
            model.load_state_dict(_state_dict(args.checkpoint))
        except RuntimeError as err:
            raise ValueError(f"{args.checkpoint}: does not fit {args.model} with --num-classes {args.num_classes}: "
                             f"{str(err).splitlines()[0][:300]}") from None
    model.eval()
    x = torch.randn(1, *args.input_size)
    macs0, params0 = count_ops_and_params(model, x)
    _progress(f"{macs0 / 1e6:.1f}M MACs, {params0 / 1e6:.2f}M params; ranking and pruning the stripes (the "
              "dependency graph and the exactness check can take minutes for a large model or input)")
    target = ({"macs_reduction": args.macs_reduction} if args.macs_reduction is not None
              else {"params_reduction": args.params_reduction})
    pruner = StripePruner(model, x, ignored_layers=[model.get_classifier()], **target)
    pruner.step()
    macs, params = count_ops_and_params(model, x)
    _progress(f"pruned; writing {args.out}")
    save(model, args.out, architecture=args.model, num_classes=args.num_classes, input_size=list(args.input_size))
    print(f"{args.model}: MACs {macs0 / 1e6:.1f}M -> {macs / 1e6:.1f}M ({1 - macs / macs0:.1%} less), "
          f"params {params0 / 1e6:.2f}M -> {params / 1e6:.2f}M; saved {args.out}")


def _report(args: argparse.Namespace) -> None:
    if args.plot:
        check_writable(args.plot)
    spec = model_spec(args.file, read(args.file).get("metadata", {}))
    model = create_model(spec["architecture"], num_classes=spec["num_classes"], in_chans=spec["input_size"][0],
                         **spec["model_kwargs"])
    model = load(args.file, model)
    report(model, torch.randn(1, *spec["input_size"]))
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
    except (ValueError, OSError, RuntimeError, MemoryError) as err:
        message = str(err) or type(err).__name__
        if isinstance(err, MemoryError) or "can't allocate memory" in message or "out of memory" in message:
            message = (f"out of memory ({message[:200]}); try a smaller --input-size (the pruner runs the model on "
                       "one example of that size) or a machine with more memory")
        parser.exit(2, f"swp {args.command}: error: {message}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
