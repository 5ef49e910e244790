"""The timm contract of a stripe-pruned model (swp_plugin/testing/contract.py): EMA through step(), deep copies,
script (pruned and deployed), plain fx trace, tp.state_dict, reset_classifier, deployed model under bf16 autocast,
torch-pruning's counter. One small model by default; one model per family of the sweep under ``-m slow``."""

from __future__ import annotations

import pytest
import timm
import torch
import torch_pruning as tp

from swp_plugin.testing.contract import CHECKS, run_contract
from swp_plugin.testing.timm_models import MODELS, REPARAM


def _fails_without_pruning(name: str) -> str | None:
    """torch-pruning's tp.load_state_dict on the unpruned timm model (it sets every public attribute it saved,
    read-only properties of timm's ConvNormAct included): the error, or None."""
    model = timm.create_model(name.removesuffix(REPARAM), num_classes=10)
    try:
        tp.load_state_dict(timm.create_model(name.removesuffix(REPARAM), num_classes=10),
                           state_dict=tp.state_dict(model))
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def _assert_contract(name: str, size: int) -> None:
    rec = run_contract(name, size)
    assert set(rec) == set(CHECKS)
    failed = {k: v for k, v in rec.items() if v != "ok"}
    state_dict = failed.pop("tp_state_dict", None)
    if state_dict is not None:  # only where torch-pruning fails on the plain timm model the same way
        plain = _fails_without_pruning(name)
        assert plain is not None and plain.split(":")[0] == state_dict.split(":")[0], (state_dict, plain)
    assert not failed, failed


def test_contract_on_a_small_timm_resnet():
    torch.manual_seed(0)
    _assert_contract("resnet10t", 32)


FAMILIES = {}
for _name, _family in MODELS.items():
    FAMILIES.setdefault(_family, _name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES.values()))
def test_contract_per_family(name):
    _assert_contract(name, 64)
