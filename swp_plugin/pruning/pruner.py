"""``StripePruner``: Stripe-Wise Pruning (Meng et al., NeurIPS 2020) as a torch-pruning pruner.

Usage (the user's own training loop)::

    pruner = StripePruner(model, example_inputs, sr=1e-5, threshold=0.05, ignored_layers=[model.fc])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)  # after!
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward()
        pruner.regularize(model)        # after backward (and scaler.unscale_ with AMP), before step
        optimizer.step()
    pruner.step()                       # prunes in place; rebuild the optimizer for fine-tuning
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from ..layers.stripe_conv import StripeConv2d
from ..skeleton import MASK_SAFE_CONVS, attach_channel_mask, attach_skeletons, detach_skeletons, filter_alive
from ..skeleton.attach import probe_input
from ..skeleton.parametrizations import ChannelMask
from .channels import fed_norms, plan_channel_removal, record_input_amax, run_model
from .functions import customized_pruners, torch_pruning_kwargs
from .importance import StripeImportance

_TRACE_OPTIONS = ("forward_fn", "output_transform", "unwrapped_parameters")


def _check_number(name: str, value, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be finite and >= {minimum}, got {value!r}")
    return float(value)


def _probe_inputs(example_inputs) -> List:
    """The example inputs and a seeded random batch of the same shapes (float tensors only)."""
    gen = torch.Generator().manual_seed(0)

    def randomize(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x)
        if isinstance(x, (tuple, list)):
            return type(x)(randomize(v) for v in x)
        if isinstance(x, dict):
            return {k: randomize(v) for k, v in x.items()}
        return x

    return [example_inputs, randomize(example_inputs)]


def _flat_outputs(output) -> List[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _flat_outputs(o)]
    return []


class StripePruner(tp.pruner.BasePruner):
    """Learns a Filter Skeleton per conv during training and prunes stripes and dead channels.

    Args:
        model: the network; its convs get Filter Skeletons (parametrizations) at construction.
        example_inputs: inputs for DepGraph tracing and for the exactness checks of ``step()``.
        sr: L1 strength on the skeletons (the paper's alpha, default 1e-5).
        threshold: stripes with ``|FS| <= threshold`` die (the paper's delta, default 0.05).
        ignored_layers: modules (and their submodules) left untouched, e.g. the classifier.
        verify: after ``step()``, compare outputs with those before it (eval mode) and raise if they differ
            by more than ``tolerance * max|y|``.
        **kwargs: any other ``tp.pruner.BasePruner`` option (``forward_fn``, ``output_transform``,
            ``customized_pruners``, ``unwrapped_parameters``, ...).

    Attributes:
        skeletons: qualified conv name -> Filter Skeleton parameter, ``(out, kh, kw)`` for a conv.
        skipped: qualified conv name -> why it got no skeleton.
        notes: what ``step()`` left in place and why (filled by ``step()``).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        sr: float = 1e-5,
        threshold: float = 0.05,
        ignored_layers: Sequence[nn.Module] | None = None,
        importance: tp.importance.Importance | None = None,
        verify: bool = True,
        tolerance: float = 1e-4,
        **kwargs,
    ) -> None:
        self.sr = _check_number("sr", sr)
        self.threshold = _check_number("threshold", threshold)
        self.tolerance = _check_number("tolerance", tolerance)
        self.verify = verify
        for layer in ignored_layers or ():
            if not isinstance(layer, (nn.Module, nn.Parameter)):
                raise ValueError(
                    f"ignored_layers must hold nn.Module (or nn.Parameter) objects, got {layer!r} "
                    f"({type(layer).__name__}); pass the modules themselves, e.g. [model.fc]"
                )
        self._check_runs(model, example_inputs)
        self.example_inputs = example_inputs
        self._trace_options = {k: kwargs.get(k) for k in _TRACE_OPTIONS}
        self._customized_pruners = {**customized_pruners(), **(kwargs.pop("customized_pruners", None) or {})}
        kwargs.setdefault("pruning_ratio", 0.0)  # channels are chosen by the skeletons, not by a ratio
        kwargs.setdefault("root_module_types", torch_pruning_kwargs()["root_module_types"])
        super().__init__(
            model,
            example_inputs,
            importance=importance if importance is not None else StripeImportance(),
            ignored_layers=ignored_layers,
            customized_pruners=self._customized_pruners,
            **kwargs,
        )
        self._fs, self.skipped = attach_skeletons(model, self.ignored_layers)
        if not self._fs:
            raise ValueError(
                "StripePruner found no eligible conv in the model (every nn.Conv2d is ignored or excluded: "
                f"{self.skipped or 'the model has none'}); nothing to prune."
            )
        modules = dict(model.named_modules())
        self._layers: Dict[str, nn.Module] = {name: modules[name] for name in self._fs}
        self._channel_masks: Dict[str, List[Tuple[nn.Module, str, ChannelMask]]] = {}
        for name, layer in self._layers.items():
            targets = [(norm, t) for norm in fed_norms(self.DG, layer) for t in ("weight", "bias")]
            if getattr(layer, "bias", None) is not None:
                targets.append((layer, "bias"))
            self._channel_masks[name] = [(m, t, attach_channel_mask(m, t)) for m, t in targets]
        self.notes: List[str] = []
        self._stepped = False

    # ------------------------------------------------------------------ public state
    @property
    def skeletons(self) -> Mapping[str, nn.Parameter]:
        """Qualified conv name -> Filter Skeleton ``(out, kh, kw)`` (``(S,)`` for a StripeConv2d)."""
        return {name: fs.skeleton for name, fs in self._fs.items()}

    def stripe_sparsity(self) -> float:
        """Fraction of stripes that are dead (over all skeleton layers)."""
        dead = sum(int((~fs.alive).sum()) for fs in self._fs.values())
        return dead / max(1, sum(fs.alive.numel() for fs in self._fs.values()))

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def regularize(self, model: nn.Module | None = None, reg: float | None = None) -> None:
        """The reference training step; call after ``loss.backward()``, before ``optimizer.step()``.

        Adds ``reg * sign(FS)`` (default ``sr``) to every skeleton's gradient, kills stripes with
        ``|FS| <= threshold`` for good (FS and its grad zeroed, masked in forward), and for a filter with
        no stripe left masks the affine params (and grads) of the BatchNorm it feeds and its own bias, so
        the channel outputs exactly zero. With AMP call ``scaler.unscale_(optimizer)`` first. ``model`` is
        accepted for torch-pruning compatibility (a DDP wrapper is fine); the pruner's own model is used.
        """
        reg = self.sr if reg is None else _check_number("reg", reg)
        self._require_not_stepped("regularize")
        if all(fs.skeleton.grad is None for fs in self._fs.values()):
            raise RuntimeError(
                "regularize() found no gradient on any Filter Skeleton: call it after loss.backward() "
                "and before optimizer.step(), and build the optimizer after the StripePruner."
            )
        for name, fs in self._fs.items():
            skeleton = fs.skeleton
            if skeleton.grad is not None:
                skeleton.grad.add_(torch.sign(skeleton) * reg)
            self._kill_stripes(name, fs.alive & (skeleton.abs() > self.threshold))

    def update_regularizer(self) -> None:
        """Re-synchronise the channel masks with the stripe masks (e.g. after loading a checkpoint)."""
        for name, fs in self._fs.items():
            self._kill_stripes(name, fs.alive)

    @torch.no_grad()
    def _kill_stripes(self, name: str, alive: torch.Tensor) -> None:
        fs = self._fs[name]
        fs.alive.copy_(alive)
        fs.skeleton.mul_(alive)
        if fs.skeleton.grad is not None:
            fs.skeleton.grad.mul_(alive)
        channels = filter_alive(self._layers[name], alive)
        for module, tensor_name, mask in self._channel_masks[name]:
            mask.mask.copy_(channels)
            original = module.parametrizations[tensor_name].original
            original.mul_(channels)
            if original.grad is not None:
                original.grad.mul_(channels)

    def detach(self, merge: bool = True) -> None:
        """Take every skeleton and mask off the model without pruning (``merge``: bake them in)."""
        self._require_not_stepped("detach")
        detach_skeletons(self.model, merge=merge)
        self._stepped = True

    # ------------------------------------------------------------------ pruning
    def step(self, interactive: bool = False) -> Iterator[tp.Group] | None:
        """Merge the skeletons into the weights, remove dead channels, convert convs to ``StripeConv2d``.

        With ``interactive=True`` returns a generator of the channel-removal groups (call
        ``group.prune()`` on each, as with torch-pruning); the conversion to ``StripeConv2d`` and the
        exactness check run when the generator is exhausted.
        """
        self._require_not_stepped("step")
        self._validate()
        if interactive:
            return self._prune()
        for group in self._prune():
            group.prune()
        return None

    def _prune(self) -> Iterator[tp.Group]:
        model = self.model
        was_training = model.training
        model.eval()
        probes = _probe_inputs(self.example_inputs)
        with torch.no_grad():
            reference = [_flat_outputs(run_model(model, p)) for p in probes] if self.verify else []
        self._merge()
        self._stepped = True
        self.DG = self._build_graph()
        amax = record_input_amax(model, probes)
        plan, self.notes = plan_channel_removal(self.DG, self._layers.values(), amax)
        for root, fn, idxs in plan:
            yield self.DG.get_pruning_group(root, fn, idxs)
        self._convert()
        self.DG = self._build_graph()
        if self.verify:
            self._check_exact(reference, probes)
        model.train(was_training)

    @torch.no_grad()
    def _merge(self) -> None:
        # Prune what regularize() killed (and stripes whose FS is exactly 0); a stripe that the very last
        # optimizer step pushed under the threshold still computes something and is kept, so the merge
        # never changes the function (regularize() would kill it at the next iteration).
        for name, fs in self._fs.items():
            self._kill_stripes(name, fs.alive & fs.skeleton.ne(0))
        detach_skeletons(self.model, merge=True)

    def _convert(self) -> None:
        for name, layer in self._layers.items():
            if isinstance(layer, StripeConv2d):
                layer.select_stripes(layer.weight.detach().ne(0).any(dim=1))
            elif layer.groups != 1:
                self.notes.append(f"{name}: grouped conv (groups={layer.groups}) kept dense, dead stripes zeroed")
            else:
                stripe = StripeConv2d.from_dense(layer)
                if _same_function(layer, stripe):
                    _replace_module(self.model, layer, stripe)
                    self._layers[name] = stripe
                else:
                    self.notes.append(f"{name}: {type(layer).__name__} forward differs from a plain conv; kept dense")

    def _build_graph(self) -> tp.DependencyGraph:
        return tp.DependencyGraph().build_dependency(
            self.model,
            self.example_inputs,
            customized_pruners=self._customized_pruners,
            ignored_params=self.ignored_params,
            **self._trace_options,
        )

    @torch.no_grad()
    def _check_exact(self, reference: List[List[torch.Tensor]], probes: List) -> None:
        for ref, probe in zip(reference, probes, strict=False):
            out = _flat_outputs(run_model(self.model, probe))
            for r, o in zip(ref, out, strict=False):
                if r.shape != o.shape:
                    raise RuntimeError(f"step() changed an output shape from {tuple(r.shape)} to {tuple(o.shape)}")
                scale = float(r.abs().max()) or 1.0
                err = float((r - o).abs().max()) / scale
                if not err <= self.tolerance:
                    raise RuntimeError(
                        f"step() changed the model's outputs: max|diff|/max|y| = {err:.3g} > {self.tolerance:g}. "
                        "This model has an op that the channel analysis does not model; please report it. "
                        "Pass verify=False to keep the result anyway."
                    )

    # ------------------------------------------------------------------ checks
    def _require_not_stepped(self, what: str) -> None:
        if self._stepped:
            raise RuntimeError(
                f"{what}() after step()/detach(): the skeletons are already merged and pruned. "
                "Build a new StripePruner for another round."
            )

    def _validate(self) -> None:
        for name, fs in self._fs.items():
            if not torch.isfinite(fs.skeleton).all():
                raise ValueError(f"Filter Skeleton of '{name}' holds NaN/Inf; fix training (lower lr/sr) first")
            weight = self._layers[name].parametrizations["weight"].original
            if not torch.isfinite(weight).all():
                raise ValueError(f"weight of '{name}' holds NaN/Inf; the model cannot be pruned exactly")

    @staticmethod
    def _check_runs(model: nn.Module, example_inputs) -> None:
        was_training = model.training
        try:
            with torch.no_grad():
                run_model(model.eval(), example_inputs)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise ValueError(
                f"example_inputs do not run through the model ({type(err).__name__}: {err}). "
                "Pass inputs of the shape, dtype and device the model expects."
            ) from err
        finally:
            model.train(was_training)


@torch.no_grad()
def _same_function(conv: nn.Conv2d, stripe: StripeConv2d) -> bool:
    """True for the conv classes known to be plain convolutions, else checked on a probe input."""
    if type(conv) in MASK_SAFE_CONVS:
        return True
    x = probe_input(conv)
    return torch.allclose(stripe(x), conv(x), rtol=1e-4, atol=1e-5)


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child (a module may be registered under several parents)."""
    for parent in model.modules():
        for key, child in parent._modules.items():
            if child is old:
                parent._modules[key] = new
