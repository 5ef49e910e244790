"""swp_plugin.pruning.options: every torch-pruning BasePruner option StripePruner accepts has an effect, every other
one is refused with the reason; BasePruner methods without a stripe meaning are refused too."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import calibrate_bn, randomize_skeletons, rel_err

from swp_plugin import StripeImportance, StripePruner
from swp_plugin.models import resnet20
from swp_plugin.pruning.options import REFUSED


def _model():
    torch.manual_seed(0)
    return resnet20(width=0.25), torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("option", sorted(REFUSED))
def test_refused_base_pruner_options_say_why(option):
    model, x = _model()
    with pytest.raises(TypeError, match=option):
        StripePruner(model, x[:1], ignored_layers=[model.fc], **{option: 0.5})


def test_importance_unknown_options_and_local_ranking_are_refused():
    model, x = _model()
    with pytest.raises(TypeError, match="StripeImportance"):
        StripePruner(model, x[:1], importance=StripeImportance())
    with pytest.raises(TypeError, match="unknown StripePruner option"):
        StripePruner(model, x[:1], pruning_ratios=0.3)
    with pytest.raises(ValueError, match="global_pruning=False"):
        StripePruner(model, x[:1], macs_reduction=0.3, global_pruning=False)
    for option in ({"iterative_steps": 3}, {"max_pruning_ratio": 0.5}):
        with pytest.raises(ValueError, match="act on a target"):
            StripePruner(model, x[:1], **option)
    with pytest.raises(ValueError, match="iterative_pruning_ratio_scheduler"):
        StripePruner(model, x[:1], macs_reduction=0.3, iterative_steps=2,
                     iterative_pruning_ratio_scheduler=lambda r, k: [0.0, 0.9, 0.9])


def test_scheduler_sets_each_iterative_step_goal():
    model, x = _model()
    front_loaded = lambda ratio, steps: [0.0] + [ratio] * steps  # noqa: E731
    pruner = StripePruner(model, x[:1], macs_reduction=0.4, iterative_steps=3, global_pruning=True,
                          iterative_pruning_ratio_scheduler=front_loaded, ignored_layers=[model.fc])
    pruner.step()
    assert pruner.target_history[0][0] == pytest.approx(0.4)
    assert abs(pruner.target_history[0][1] - 0.4) <= 0.03


def test_forward_fn_and_output_transform_are_used():
    """A model called with a dict and returning a tuple: forward_fn runs it (tracing, checks), output_transform
    picks the traced output."""

    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = resnet20(width=0.25)

        def forward(self, image, scale):
            logits = self.net(image * scale)
            return logits, logits.softmax(1)

    torch.manual_seed(0)
    model = DictNet()
    inputs = {"image": torch.randn(2, 3, 16, 16), "scale": 2.0}
    calls = []

    def forward_fn(m, x):
        calls.append(1)
        return m(x["image"], x["scale"])

    pruner = StripePruner(model, inputs, forward_fn=forward_fn, output_transform=lambda out: out[0],
                          ignored_layers=[model.net.fc])
    assert calls and pruner.DG is not None
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.3)
    calibrate_bn(model.net, inputs["image"] * 2)
    model.eval()
    with torch.no_grad():
        before = model(inputs["image"], 2.0)[0]
    pruner.step()
    with torch.no_grad():
        assert rel_err(before, model(inputs["image"], 2.0)[0]) < 1e-4


@pytest.mark.parametrize("method", ["manual_prune_width", "estimate_importance", "pruning_history",
                                    "load_pruning_history", "get_target_pruning_ratio", "reset"])
def test_base_pruner_methods_without_stripe_meaning_are_refused(method):
    model, x = _model()
    pruner = StripePruner(model, x[:1], ignored_layers=[model.fc])
    with pytest.raises(NotImplementedError, match="StripePruner"):
        getattr(pruner, method)(model.conv1)
