"""The timm contract of a stripe-pruned model (swp_plugin/testing/contract.py): EMA through step(), deep copies,
script (pruned and deployed), plain fx trace, tp.state_dict, reset_classifier, deployed model under bf16 autocast,
torch-pruning's counter. One small model by default; one model per family of the sweep under ``-m slow``, where a
check may fail only as :data:`~swp_plugin.testing.contract.LIMITATIONS` says (timm's unpruned model failing it the
same way), and a listed limitation that no longer fails is an error too."""

from __future__ import annotations

import pytest
import timm
import torch

from swp_plugin.pruning import StripePruner
from swp_plugin.testing.contract import CHECKS, LIMITATIONS, OPEN, expected_failures, plain_failure, run_contract
from swp_plugin.testing.exactness import unzero_norm_weights
from swp_plugin.testing.timm_models import MODELS

FAMILIES = {}
for _name, _family in MODELS.items():
    FAMILIES.setdefault(_family, _name)

#: input size of the per-family runs, and where it is too small (inception_v3's reductions leave 64x64 smaller
#: than the 3x3 kernels of its last stage)
SIZE = 64
SIZES = {"inception_v3": 96}


def _assert_contract(name: str, size: int) -> None:
    try:
        rec = run_contract(name, size)
    except Exception as err:  # the set-up (pruning) itself failed: one record
        rec = {"setup": f"{type(err).__name__}: {err}"}
    else:
        assert set(rec) == set(CHECKS)
    failed = {k: v for k, v in rec.items() if v != "ok"}
    expected = expected_failures(name)
    if "setup" in failed:  # no check ran: only the set-up's own limitation can be held to
        expected = {k: v for k, v in expected.items() if k == "setup"}
    for check, reason in expected.items():
        assert check in failed, f"{name}: {check} works now; remove it from LIMITATIONS ({reason})"
        plain, pruned = plain_failure(name, check, size), failed.pop(check)
        assert plain is not None and plain.split(":")[0] == pruned.split(":")[0], (pruned, plain)
    assert not failed, failed


def test_contract_on_a_small_timm_resnet():
    torch.manual_seed(0)
    _assert_contract("resnet10t", 32)


def test_unzero_norm_weights_sets_only_all_zero_batchnorm_weights_masked_or_not():
    """timm's zero_init_last BatchNorms (bn2 of each resnet10t block) get weight 1, through a pruner's channel mask
    too; every other BatchNorm keeps its weight."""
    model = timm.create_model("resnet10t", num_classes=10).eval()
    StripePruner(model, torch.randn(1, 3, 32, 32), ignored_layers=[model.get_classifier()])
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    zero = {n for n, m in bns.items() if not m.weight.any()}
    before = {n: m.weight.detach().clone() for n, m in bns.items()}
    assert zero and all(n.endswith("bn2") for n in zero)
    assert unzero_norm_weights(model) == len(zero)
    for n, m in bns.items():
        assert torch.equal(m.weight, torch.ones_like(m.weight) if n in zero else before[n]), n
    assert unzero_norm_weights(model) == 0


def test_limitations_name_families_of_the_sweep_and_known_checks():
    for lim in LIMITATIONS:
        assert lim.check in (*CHECKS, "setup") and lim.reason and set(lim.models) <= set(FAMILIES.values()), lim
    assert set(OPEN) <= set(FAMILIES.values())
    assert expected_failures("resnet10t") == {}


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=OPEN[n])) if n in OPEN
                                  else n for n in sorted(FAMILIES.values())])
def test_contract_per_family(name):
    _assert_contract(name, SIZES.get(name, SIZE))
