"""The form of the model ``deploy()`` returns (swp_plugin.deployment.forward): plain inference calls run its
TorchScript twin, the same function as the eager forward; the twin reads the module's own tensors, steps aside for
hooks, training, compile, ONNX export, and is dropped when the module tree changes;
a deployed file loaded with ``swp_plugin.load`` runs its twin too."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from swp_plugin.deployment import DeployedGraphModule, deploy
from swp_plugin.layers.kernels import cpu as cpu_kernel
from swp_plugin.models import resnet56
from swp_plugin.testing import calibrate_bn, random_stripe_model, rel_err

needs_cpp = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no compiled kernel: {cpu_kernel.build_error()}")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = random_stripe_model(resnet56(width=0.5).eval(), 0.3)
    calibrate_bn(model, torch.randn(4, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    forced = {n: "kernel" for n, m in model.named_modules() if hasattr(m, "stripe_out")}
    return model.eval(), x, forced


def _eager(deployed: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The output of the eager forward (a forward hook makes the call take it) and whether the hook ran."""
    ran = []
    handle = deployed.register_forward_hook(lambda m, i, o: ran.append(True))
    try:
        return deployed(x), bool(ran)
    finally:
        handle.remove()


def _assert_twin_follows(deployed: nn.Module, x: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """After a change of the weights: the twin still runs, equals the eager forward, and the output changed."""
    after = deployed(x)
    eager, _ = _eager(deployed, x)
    assert deployed.forward_form != "eager" and rel_err(after, eager) < 1e-6 and rel_err(after, before) > 1e-3
    return after


@needs_cpp
@torch.no_grad()
def test_deployed_model_runs_its_twin_and_matches_the_eager_forward(setup):
    model, x, forced = setup
    deployed = deploy(model, x, choices=forced)
    assert isinstance(deployed, DeployedGraphModule) and deployed.forward_form in ("frozen", "scripted")
    assert deployed.deploy_report.forward == deployed.forward_form
    assert f"forward: {deployed.forward_form}" in deployed.deploy_report.summary()
    eager, hooked = _eager(deployed, x)
    assert hooked and rel_err(deployed(x), eager) < 1e-6 and rel_err(model(x), deployed(x)) < 1e-4
    plain = deploy(model, x, choices=forced, torchscript=False)
    assert plain.forward_form == "eager" and plain.deploy_report.forward.startswith("eager")
    assert rel_err(plain(x), deployed(x)) < 1e-6
    assert set(deployed.state_dict()) == set(plain.state_dict())  # a normal module: same state, same names
    assert "DeployedStripeConv2d" in repr(deployed)


@needs_cpp
@torch.no_grad()
def test_twin_reads_the_modules_own_tensors(setup):
    model, x, forced = setup
    deployed = deploy(model, x, choices=forced)
    before = deployed(x)
    state = {k: v * 0.5 if v.is_floating_point() else v for k, v in deployed.state_dict().items()}
    deployed.load_state_dict(state)  # in place
    _assert_twin_follows(deployed, x, before)


@needs_cpp
@torch.no_grad()
def test_new_weight_data_is_packed_again_before_the_next_call(setup):
    """``weight.data = ...`` (what ``.to()`` round trips and some EMA code do) shows no version change, only new
    storage: the layer's stamp sees it, so neither the twin nor the eager forward runs stale packed weights."""
    from swp_plugin.layers.deployed import DeployedStripeConv2d

    model, x, forced = setup
    deployed = deploy(model, x, choices=forced)
    before = deployed(x)
    for m in deployed.modules():
        if isinstance(m, DeployedStripeConv2d):
            m.weight.data = m.weight.data * 0.5
    after = _assert_twin_follows(deployed, x, before)
    fresh = deploy(model, x, choices=forced)
    for m, f in zip(deployed.modules(), fresh.modules()):
        if isinstance(m, DeployedStripeConv2d):
            f.weight.copy_(m.weight)
    assert rel_err(fresh(x), after) < 1e-6


@needs_cpp
@torch.no_grad()
def test_twin_is_dropped_when_a_submodule_is_replaced(setup):
    model, x, forced = setup
    deployed = deploy(model, x, choices=forced)
    fc = deployed.get_submodule("fc")
    deployed.fc = nn.Linear(fc.in_features, fc.out_features)
    y = deployed(x)
    assert deployed.forward_form == "eager"
    assert rel_err(y, _eager(deployed, x)[0]) < 1e-6


@needs_cpp
@torch.no_grad()
def test_training_mode_copies_and_compile_take_the_right_path(setup):
    model, x, forced = setup
    deployed = deploy(model, x, choices=forced)
    y = deployed(x)
    assert deployed.train().forward_form != "eager"  # the twin stays, unused in training mode
    deployed.eval()
    copied = copy.deepcopy(deployed)
    assert copied.forward_form == deployed.forward_form and rel_err(copied(x), y) < 1e-6
    compiled = torch.compile(deployed, backend="eager", fullgraph=True)
    assert rel_err(compiled(x), y) < 1e-6
    scripted = torch.jit.script(deployed)
    assert rel_err(scripted(x), y) < 1e-6


@needs_cpp
@torch.no_grad()
def test_a_loaded_deployed_model_runs_its_twin_too(setup, tmp_path):
    """swp_plugin.load rebuilds a deployed file from its recorded choices (no timing, no data) and returns the same
    fast form as deploy() (the TorchScript twin), with the same outputs."""
    import swp_plugin

    model, x, _ = setup
    deployed = deploy(model, x)
    swp_plugin.save(deployed, tmp_path / "dep.pt")
    loaded = swp_plugin.load(tmp_path / "dep.pt", resnet56(width=0.5))  # a fresh, unpruned instance
    assert isinstance(loaded, DeployedGraphModule)
    assert loaded.deploy_source["choices"] == deployed.deploy_source["choices"]
    assert loaded.forward_form == deployed.forward_form != "eager"
    assert rel_err(loaded(x), deployed(x)) < 1e-6


@needs_cpp
@torch.no_grad()
def test_a_hook_on_a_layer_inside_takes_the_eager_forward(setup):
    model, x, forced = setup
    deployed = deploy(model, x, choices=forced)
    y = deployed(x)
    name = [n.target for n in deployed.graph.nodes if n.op == "call_module"][5]
    ran = []
    handle = deployed.get_submodule(name).register_forward_pre_hook(lambda m, i: ran.append(True))
    assert rel_err(deployed(x), y) < 1e-6 and ran == [True]
    handle.remove()
    deployed(x)
    assert ran == [True] and deployed.forward_form != "eager"


def test_the_cheap_onnx_test_agrees_with_torch_during_an_export():
    """The twin's pre-call check reads torch's ONNX flags directly (``torch.onnx.is_in_onnx_export()`` imports
    two modules per call): the same answer with each of torch's two export flags set and with neither. (Set here
    by hand: a real export in this process left a later export of a deployed model failing.)"""
    from torch.onnx._internal.exporter import _flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    from swp_plugin.deployment.forward import _in_onnx_export

    assert not _in_onnx_export() and not torch.onnx.is_in_onnx_export()
    for owner, name in ((GLOBALS, "in_onnx_export"), (_flags, "_is_onnx_exporting")):
        before = getattr(owner, name)
        setattr(owner, name, True)
        try:
            assert _in_onnx_export() and torch.onnx.is_in_onnx_export()
        finally:
            setattr(owner, name, before)
    assert not _in_onnx_export()


@needs_cpp
@torch.no_grad()
def test_a_write_to_one_of_two_equal_layers_reaches_the_twin():
    """Freezing pools tensor constants of equal value into one: two layers with equal weights, stripes and biases
    read one tensor in a frozen graph. After a write to one of them the call makes the twin again, so it follows
    the write (it agrees with the eager forward) and stays the fast form."""
    from swp_plugin import StripeConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    mask = torch.rand(8, 3, 3) < 0.5
    model = nn.Sequential(StripeConv2d.from_dense(conv, mask), nn.ReLU(),
                          StripeConv2d.from_dense(copy.deepcopy(conv), mask.clone())).eval()
    x = torch.randn(1, 8, 12, 12)
    deployed = deploy(model, x, choices={"0": "kernel", "2": "kernel"})
    before = deployed(x)
    assert deployed.forward_form == "frozen"
    second = deployed.get_submodule("2")
    second.weight.mul_(-2.0)  # in place: now unlike the first layer's
    second.bias.add_(1.0)
    after = deployed(x)
    eager, hooked = _eager(deployed, x)
    assert hooked and deployed.forward_form == "frozen"
    assert rel_err(after, eager) < 1e-6 and rel_err(after, before) > 1e-3


def _stamp_makers():
    from swp_plugin.deployment import forward

    makers = [pytest.param(forward._PyStamps, id="python")]
    native = pytest.param(lambda ts: torch.classes.swp_stripe.Stamps(ts), id="kernel", marks=needs_cpp)
    return makers + [native]


@pytest.mark.parametrize("make", _stamp_makers())
def test_the_stamps_see_every_kind_of_write_to_one_of_two_equal_tensors(make):
    a, b = torch.zeros(4), torch.zeros(4)
    writes = {"in place": lambda: b.add_(1), "through a view": lambda: b[1:].mul_(2),
              "new data": lambda: setattr(b, "data", torch.zeros(4)),
              "in place, in inference mode": lambda: _in_inference_mode(lambda: b.add_(1))}
    for name, write in writes.items():
        stamps = make([a, b])
        assert stamps.current(), name
        write()
        assert not stamps.current(), name
    stamps = make([a, b])
    assert not stamps.requires_grad()
    b.requires_grad_(True)
    assert stamps.requires_grad() and stamps.current()


def _in_inference_mode(fn):
    with torch.inference_mode():
        fn()
