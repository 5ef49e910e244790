"""swp_plugin.deploy: same function after deployment (BatchNorm folded, per-layer implementation, fused epilogues),
on the paper's nets and timm nets; scripting; fallbacks; bad input."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from swp_plugin import StripeConv2d, StripePruner
from swp_plugin.deployment import DeployedStripeConv2d, deploy
from swp_plugin.layers.kernels import cpu as cpu_kernel
from swp_plugin.models import resnet56, vgg16_bn
from swp_plugin.testing import calibrate_bn, random_stripe_model, randomize_skeletons, rel_err

needs_cpp = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no compiled kernel: {cpu_kernel.build_error()}")


def _pruned(model: nn.Module, x: torch.Tensor, dead_filters: float = 0.2) -> nn.Module:
    """Stripe-pruned with dead stripes and dead filters (channels removed), BatchNorm statistics calibrated."""
    head = model.get_classifier()
    pruner = StripePruner(model, x[:1], ignored_layers=[head] if head is not None else [])
    randomize_skeletons(pruner, dead_stripes=0.6, dead_filters=dead_filters)
    calibrate_bn(model, x)
    pruner.step()
    calibrate_bn(model, x)
    return model.eval()


def _check(model: nn.Module, x: torch.Tensor, **kwargs) -> nn.Module:
    deployed = deploy(model, x[:1], **kwargs)
    with torch.no_grad():
        assert rel_err(model(x), deployed(x)) < 1e-4
    return deployed


@needs_cpp
@pytest.mark.parametrize("net", ["vgg16_bn", "resnet56"])
def test_paper_nets_fold_fuse_and_match(net):
    torch.manual_seed(0)
    model = (vgg16_bn if net == "vgg16_bn" else resnet56)(width=0.5)
    x = torch.randn(6, 3, 32, 32)
    model = _pruned(model, x)
    # every stripe layer on the kernel (a measured choice depends on the machine's load and on sanitizer builds)
    forced = {n: "kernel" for n, m in model.named_modules() if isinstance(m, StripeConv2d)}
    deployed = _check(model, x, choices=forced)
    report = deployed.deploy_report
    assert report.traced and len(report.folded) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    kernel = [m for m in deployed.modules() if isinstance(m, DeployedStripeConv2d)]
    assert len(kernel) == sum(c["impl"] == "kernel" for c in report.choices) == len(forced) > 0
    assert any(m.act == "relu" for m in kernel)
    if net == "resnet56":  # conv2 -> bn2 -> add(shortcut) -> relu runs in the epilogue
        assert any(m.residual and m.act == "relu" for m in kernel)
    assert model.training is False and any(isinstance(m, StripeConv2d) for m in model.modules())  # input untouched


@needs_cpp
def test_relu_behind_timm_identities_runs_in_the_epilogue():
    """timm's BasicBlock: conv1 -> bn1 -> drop_block (Identity) -> act1 -> aa (Identity): the ReLU is fused
    through the Identities, so no ReLU is left in the deployed graph."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    model = _pruned(model, x)
    forced = {n: "kernel" for n, m in model.named_modules() if isinstance(m, StripeConv2d)}
    deployed = _check(model, x, choices=forced)
    fused = deployed.deploy_report.fused
    assert all(any(line.startswith(f"layer{i}.{j}.conv1: ") and line.endswith("relu") for line in fused)
               for i in range(1, 5) for j in range(2))
    assert not any(isinstance(m, (nn.ReLU, nn.Identity)) for m in deployed.modules())


def test_planned_epilogues_time_the_dense_conv_with_what_the_kernel_would_fuse():
    from swp_plugin.deployment.graph import fold_batchnorms, planned_epilogues, trace
    from swp_plugin.deployment.pipeline import _DenseWithEpilogue, time_choice
    from swp_plugin.utils import fastest_in_script

    model = timm.create_model("resnet18", num_classes=10).eval()
    gm = trace(model)
    fold_batchnorms(gm)
    planned = planned_epilogues(gm)  # through drop_block / aa (Identity)
    assert planned["layer1.0.conv1"] == (False, True) and planned["layer1.0.conv2"] == (True, True)
    assert "layer2.0.downsample.0" not in planned  # its add went to conv2, the first conv before it
    conv = gm.get_submodule("layer1.0.conv2")
    x = torch.randn(1, 64, 8, 8)
    times = time_choice(conv, conv, x, residual=True, relu=True)
    assert set(times) == {"dense", "kernel"} and all(t > 0 for t in times.values())
    with_epilogue = _DenseWithEpilogue(conv, torch.randn_like(conv(x)), True)  # scripts: timed without Python
    assert fastest_in_script({"dense": with_epilogue}, x, 4) is not None
    assert torch.equal(with_epilogue(x), torch.relu(conv(x) + with_epilogue.residual))


@needs_cpp
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100", "efficientnet_b0", "tf_efficientnet_b0",
                                  "densenet121", "regnetx_002"])
def test_timm_nets_match_after_deploy(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    x = torch.randn(3, 3, 64, 64)
    _check(_pruned(model, x, dead_filters=0.1), x)


@needs_cpp
def test_every_layer_forced_onto_the_kernel_and_onto_dense(monkeypatch):
    """Both implementations are exact whatever the timing says (epilogues included)."""
    import swp_plugin.deployment.pipeline as deployment

    torch.manual_seed(0)
    model = _pruned(resnet56(width=0.5), torch.randn(4, 3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    for winner in ("kernel", "dense"):
        monkeypatch.setattr(deployment, "time_choice", lambda *args, w=winner: {
            k: float(k != w) for k in ("dense", "kernel")})
        deployed = _check(model, x)
        assert {c["impl"] for c in deployed.deploy_report.choices} == {winner}


@needs_cpp
def test_scripted_and_traced_deployed_model():
    torch.manual_seed(0)
    model = random_stripe_model(resnet56(width=0.5).eval(), 0.3)
    calibrate_bn(model, torch.randn(4, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    deployed = deploy(model, x)
    with torch.no_grad():
        y = deployed(x)
        scripted = torch.jit.freeze(torch.jit.script(deployed.eval()))
        traced = torch.jit.trace(deployed, x)
        assert rel_err(y, scripted(x)) < 1e-6 and rel_err(y, traced(x)) < 1e-6
        assert "swp_stripe::forward" in str(scripted.graph)
        compiled = torch.compile(deployed, backend="eager", fullgraph=True)
        assert rel_err(y, compiled(x)) < 1e-6


@needs_cpp
def test_plain_model_gets_the_same_folding():
    torch.manual_seed(0)
    model = vgg16_bn(width=0.25).eval()
    x = torch.randn(4, 3, 32, 32)
    calibrate_bn(model, x)
    deployed = _check(model, x)
    assert len(deployed.deploy_report.folded) == 13
    assert _check(model, x, dense_convs=False).deploy_report.choices == []


def test_untraceable_model_falls_back_to_the_module_tree():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.bn(self.conv(x))
            if float(y.mean()) > 1e9:  # data-dependent control flow: torch.fx cannot trace it
                return y
            return self.head(torch.relu(y))

    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(4, 3, 16, 16)
    calibrate_bn(model, x)
    deployed = _check(model, x)
    report = deployed.deploy_report
    assert not report.traced and report.folded == [("conv", "bn")] and "torch.fx" in report.notes[0]
    assert isinstance(deployed.bn, nn.Identity)


def test_attached_skeletons_are_refused():
    model = resnet56(width=0.25)
    StripePruner(model, torch.randn(1, 3, 32, 32), ignored_layers=[model.fc])
    with pytest.raises(ValueError, match="pruner.step"):
        deploy(model, torch.randn(1, 3, 32, 32))


@needs_cpp
def test_deployed_layer_falls_back_to_pytorch_where_the_kernel_cannot_run(monkeypatch):
    import swp_plugin.layers.deployed as layer_module

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    mask = torch.rand(16, 3, 3) < 0.4
    with torch.no_grad():
        conv.weight.mul_(mask[:, None])
    layer = DeployedStripeConv2d(StripeConv2d.from_dense(conv, mask), act="relu", residual=True)
    x, res = torch.randn(2, 8, 15, 13), torch.randn(2, 16, 8, 7)
    want = torch.relu(conv(x) + res)
    with torch.no_grad():
        assert rel_err(want, layer(x, res)) < 1e-5
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
        monkeypatch.setattr(layer_module, "_warned", [False])
        with pytest.warns(RuntimeWarning, match="computing the same function with PyTorch"):
            got = layer(x, res)
        assert rel_err(want, got) < 1e-5
        for form in ("dense", "stripe"):
            layer.prepare_export(form)
            assert rel_err(want, layer._pytorch_forward(x, res)) < 1e-5


@needs_cpp
@pytest.mark.parametrize("size, batch", [((3, 3), 16), ((4, 5), 9), ((8, 8), 64), ((1, 1), 8), ((7, 9), 12)])
def test_kernel_small_image_batch_path_with_epilogue(size, batch):
    """Small images in batches (several images per work item of the kernel); bias, residual and ReLU there too."""
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 20, 3, padding=1)
    mask = torch.rand(20, 3, 3) < 0.5
    with torch.no_grad():
        conv.weight.mul_(mask[:, None])
    x, res = torch.randn(batch, 24, *size), torch.randn(batch, 20, *size)
    _assert_epilogues(conv, mask, x, res)


def _assert_epilogues(conv: nn.Conv2d, mask: torch.Tensor, x: torch.Tensor, res: torch.Tensor) -> None:
    """The deployed layer of ``conv`` (stripes ``mask``) equals it with and without the residual + ReLU epilogue."""
    for act, residual in (("none", False), ("relu", True)):
        layer = DeployedStripeConv2d(StripeConv2d.from_dense(conv, mask), act=act, residual=residual)
        with torch.no_grad():
            want = conv(x) + (res if residual else 0)
            want = torch.relu(want) if act == "relu" else want
            assert rel_err(want, layer(x, res if residual else None)) < 1e-5


@needs_cpp
@pytest.mark.parametrize("cin, cout, stride, size, batch", [
    (64, 96, 1, (14, 14), 1), (700, 40, 1, (7, 9), 2), (1100, 24, 2, (9, 8), 1), (16, 30, 2, (11, 10), 3),
    (48, 64, (2, 1), (10, 7), 1), (256, 200, 1, (5, 5), 3), (300, 64, 2, (14, 14), 2)])
def test_kernel_single_writer_1x1_stores_its_epilogue(cin, cout, stride, size, batch):
    """1x1 convs (every output channel one panel row at shift (0, 0)): the register tiles store bias, residual
    and ReLU themselves, over blocks of input channels (cin > 384), channel splits at batch 1 and strides; from
    256 input channels they read a packed input panel (partial vectors: 5x5, 7x9)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 1, stride)
    mask = torch.ones(cout, 1, 1, dtype=torch.bool)
    x = torch.randn(batch, cin, *size)
    _assert_epilogues(conv, mask, x, torch.randn(conv(x).shape))


@needs_cpp
@pytest.mark.parametrize("size", [(56, 56), (28, 28), (64, 64), (15, 14), (9, 16), (7, 7)])
def test_kernel_strided_compact_phases_with_epilogue(size):
    """Stride 2 where every phase image is as wide as the output (even widths): compact phase images read
    with the stride-1 taps (64x64: 32x32 planes, their channel stride padded off a multiple of 4 KB); odd
    widths the bordered ones."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 40, 3, 2, 1)
    mask = torch.rand(40, 3, 3) < 0.4
    with torch.no_grad():
        conv.weight.mul_(mask[:, None])
    x = torch.randn(1, 32, *size)
    _assert_epilogues(conv, mask, x, torch.randn(conv(x).shape))


@pytest.mark.parametrize("padding, stride, mode", [(1, 1, "zeros"), ((2, 0), (2, 1), "zeros"), (1, 2, "reflect"),
                                                   ("same", 1, "zeros")])
def test_to_stripe_gives_back_the_layer(padding, stride, mode):
    """DeployedStripeConv2d.to_stripe() is the inverse of from_stripe (without an epilogue)."""
    conv = nn.Conv2d(6, 10, 3, stride=stride, padding=padding, padding_mode=mode)
    mask = torch.rand(10, 3, 3) < 0.4
    layer = StripeConv2d.from_dense(conv, mask, backend="stripe").eval()
    back = DeployedStripeConv2d.from_stripe(layer).to_stripe().eval()
    back.backend = "stripe"
    x = torch.randn(2, 6, 13, 11)
    with torch.no_grad():
        assert torch.allclose(back(x), layer(x), atol=1e-6)
    assert torch.equal(back.stripe_out, layer.stripe_out) and torch.equal(back.stripe_pos, layer.stripe_pos)


@needs_cpp
@pytest.mark.parametrize("cin, kernel, stride, padding, dilation, size", [
    (3, 7, 2, 3, 1, (29, 31)), (8, 3, 1, 1, 1, (9, 40)), (1, 5, (1, 2), 0, 2, (17, 13)), (5, 3, 3, 2, 1, (8, 8))])
def test_kernel_few_input_channels_path_with_epilogue(cin, kernel, stride, padding, dilation, size):
    """Layers with few input channels (the stem) sum each output channel's stripes in registers over padded
    phase images: same function, epilogue included."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, 19, kernel, stride, padding, dilation)
    mask = torch.rand(19, kernel, kernel) < 0.3
    with torch.no_grad():
        conv.weight.mul_(mask[:, None])
    x = torch.randn(3, cin, *size)
    res = torch.randn(conv(x).shape)
    _assert_epilogues(conv, mask, x, res)


@needs_cpp
def test_packed_weights_follow_writes_and_loads_and_are_not_saved():
    """The packed weights are derived (derive()): re-derived after load_state_dict and after an in-place write
    of the weights; state_dict holds the plain stripe weights and indexes only."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    mask = torch.rand(10, 3, 3) < 0.5
    layer = DeployedStripeConv2d(StripeConv2d.from_dense(conv, mask))
    assert set(layer.state_dict()) == {"weight", "bias", "stripe_out", "stripe_pos"}
    x = torch.randn(2, 6, 12, 12)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)
        assert rel_err(2 * before - layer.bias[:, None, None], layer(x)) < 1e-5
        other = DeployedStripeConv2d(StripeConv2d.from_dense(conv, mask))
        other.load_state_dict(layer.state_dict())
        assert torch.equal(other.packed, layer.packed) and rel_err(layer(x), other(x)) < 1e-6


@needs_cpp
def test_saved_deployed_file_with_edited_stripe_indexes_is_refused(tmp_path):
    """Issue 21: a deployed file's plan was loaded and trusted by the kernel (an edited `ptr` crashed the
    process). Plans are not in the file any more; edited stripe indexes are refused when the plan is derived."""
    import swp_plugin

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))

    x = torch.randn(1, 3, 16, 16)
    model = net().eval()
    swp_plugin.save(deploy(model, x, choices={"0": "kernel"}), tmp_path / "dep.pt")
    checkpoint = torch.load(tmp_path / "dep.pt", weights_only=True)
    assert not any(k.endswith((".ptr", ".entries", ".phase_info", ".panels", ".packed")) for k in
                   checkpoint["state_dict"])
    with torch.no_grad():
        assert rel_err(model(x), swp_plugin.load(tmp_path / "dep.pt", net())(x)) < 1e-5
    checkpoint["state_dict"]["0.stripe_out"][0] = 10 ** 9
    torch.save(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="digest"):  # an edit the file's own SHA-256 shows
        swp_plugin.load(tmp_path / "bad.pt", net())
    checkpoint["digest"] = swp_plugin.persistence.digest(checkpoint)  # an attacker recomputes it
    torch.save(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="stripe_out"):
        swp_plugin.load(tmp_path / "bad.pt", net())


@needs_cpp
@pytest.mark.parametrize("kernel, stride", [(1, 1), (3, 2)])
def test_kernel_blocks_of_many_input_channels(kernel, stride):
    """More than 384 input channels run in blocks of input channels (each block's input tile stays in cache)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(700, 24, kernel, stride, kernel // 2)
    mask = torch.rand(24, kernel, kernel) < 0.5
    mask[:, 0, 0] = True
    with torch.no_grad():
        conv.weight.mul_(mask[:, None])
    x = torch.randn(2, 700, 9, 11)
    res = torch.randn(conv(x).shape)
    layer = DeployedStripeConv2d(StripeConv2d.from_dense(conv, mask), act="relu", residual=True)
    with torch.no_grad():
        assert rel_err(torch.relu(conv(x) + res), layer(x, res)) < 1e-5
