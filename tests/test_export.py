"""passes/export.py: models torch.fx cannot trace are captured with torch.export and planned with
the same passes; where export cannot capture them either, the TraceError names the submodule
and a fix that works."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch import pipeline
from fxsketch.errors import InputError, TraceError
from fxsketch.passes.export import check_input_shapes
from fxsketch.passes.options.lean import lean_spec
from fxsketch.passes.options.probe import conv_spec
from fxsketch.passes.trace import trace

pytestmark = pytest.mark.usefixtures("one_thread")

OPTS = dict(workspace="off", progress=False, seed=0, time_nodes=False)  # roofline: no timing noise


def encoder_layer():
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)


def _check_like_eager(gm, model, x):
    """Same outputs and exact gradients as the model run eagerly (on a copy), and the module
    trains the model's own parameters, under the model's own state_dict keys."""
    twin = copy.deepcopy(model)
    out, ref = gm(x), twin(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert {id(p) for p in gm.parameters()} == {id(p) for p in model.parameters()}
    assert sorted(gm.state_dict()) == sorted(model.state_dict())
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------
# nn.TransformerEncoderLayer as the model


def test_fx_cannot_trace_a_bare_encoder_layer_so_it_is_exported():
    model, x = encoder_layer(), torch.randn(4, 16, 32)
    with pytest.raises(Exception, match="_none_or_dtype"):  # its fast-path checks run on fx proxies
        torch.fx.symbolic_trace(model)
    gm = trace(model, (x,))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.linear.default in targets and torch.ops.aten.relu.default in targets
    assert "torch.export" in gm.meta["fxsketch.capture"] and "_none_or_dtype" in gm.meta["fxsketch.capture"]
    assert gm.get_parameter("self_attn.in_proj_weight") is model.self_attn.in_proj_weight
    torch.testing.assert_close(gm(x), model(x))


def test_encoder_layer_plan_matches_the_measured_peak():
    model, x = encoder_layer(), torch.randn(4, 16, 32)
    p = fxsketch.plan(model, (x,))
    measured = fxsketch.measure(model, (x,), repeat=1).peak_bytes
    assert abs(p.tensor_peak_bytes / measured - 1) < 0.05, (p.tensor_peak_bytes, measured)
    assert any(n.startswith("captured with torch.export") and "torch.fx cannot trace the top-level model "
               "(TransformerEncoderLayer)" in n for n in p.notes), p.notes


def test_optimized_encoder_layer_is_exact_trains_and_keeps_the_model():
    model, x = encoder_layer(), torch.randn(4, 16, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxsketch.optimize(model, (x,), **OPTS)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    _check_like_eager(gm, model, x)

    target = torch.randn(4, 16, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # the model's parameters: gm trains them
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(gm(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    torch.testing.assert_close(gm(x), model(x))  # the model trained too


def test_exported_module_runs_at_another_batch_and_refuses_other_shapes():
    model, x = encoder_layer(), torch.randn(4, 16, 32)
    gm = fxsketch.optimize(model, (x,), **OPTS)
    x8 = torch.randn(8, 16, 32)  # dim 0 stays dynamic; the plan's figures are for batch 4
    torch.testing.assert_close(gm(x8), model(x8))
    with pytest.raises(InputError, match=r"torch.export for input 0 of shape \(s\w+>=2, 16, 32\), got "
                                         r"\(4, 12, 32\).*plan the model again"):
        gm(torch.randn(4, 12, 32))
    torch.testing.assert_close(pickle.loads(pickle.dumps(gm))(x), model(x))  # fx re-traces the code


def test_input_guard_checks_ranks_sizes_and_shared_dims():
    spec = ((("s0", 2, None), 3), (("s0", 2, None),))
    check_input_shapes((torch.zeros(5, 3), torch.zeros(5)), spec, "M")
    for bad in [(torch.zeros(5, 4), torch.zeros(5)), (torch.zeros(5, 3), torch.zeros(6)),
                (torch.zeros(1, 3), torch.zeros(1)), (torch.zeros(5, 3, 1), torch.zeros(5))]:
        with pytest.raises(InputError, match="captured with torch.export"):
            check_input_shapes(bad, spec, "M")


# --------------------------------------------------------------------------------------------
# aten convolutions, norms and activations


class Convs(nn.Module):
    """conv, batch norm, in-place ReLU, max-pool, leaky ReLU behind a shape branch fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 8, 3, stride=2), nn.Linear(8, 2)

    def forward(self, x):
        if x.dim() == 3:  # one image or a batch
            x = x.unsqueeze(0)
        y = F.max_pool2d(F.relu(self.bn(self.c1(x)), inplace=True), 2)
        return self.fc(F.leaky_relu(self.c2(y), 0.2).mean((2, 3)))


def test_aten_ops_are_read_by_the_options():
    gm = trace(Convs(), (torch.randn(2, 3, 16, 16),))
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_function"}
    aten = torch.ops.aten
    spec = [conv_spec(gm, n) for n in gm.graph.nodes if n.target is aten.conv2d.default]
    assert [(s["stride"], s["padding"], s["groups"]) for s in spec] == [((1, 1), (1, 1), 1), ((2, 2), (0, 0), 1)]
    assert spec[0]["weight"].op == "get_attr" and spec[0]["weight"].target == "c1.weight"
    assert lean_spec(gm, by_target[aten.relu_.default]) == dict(op="relu", inplace=True)
    assert lean_spec(gm, by_target[aten.leaky_relu.default])["negative_slope"] == 0.2
    pool = lean_spec(gm, by_target[aten.max_pool2d.default])
    assert pool["kernel_size"] == (2, 2) and pool["stride"] in (None, (2, 2)) and pool["padding"] == (0, 0)


def test_aten_convolution_is_read_unless_transposed():
    class Raw(nn.Module):
        def __init__(self, transposed):
            super().__init__()
            self.w, self.transposed = nn.Parameter(torch.randn(3, 3, 3, 3)), transposed

        def forward(self, x):
            if x.dim() == 3:
                x = x.unsqueeze(0)
            return torch.convolution(x, self.w, None, [2, 2], [1], [1, 1], self.transposed, [0, 0], 1)

    for transposed, want in [(False, dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=1)), (True, None)]:
        gm = trace(Raw(transposed), (torch.randn(2, 3, 8, 8),))
        conv = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.convolution.default)
        spec = conv_spec(gm, conv)
        assert (spec and {k: spec[k] for k in want}) == want


def test_exported_convs_plan_and_optimize_exactly():
    torch.manual_seed(0)
    model, x = Convs(), torch.randn(4, 3, 16, 16)
    p = fxsketch.plan(model, (x,))
    measured = fxsketch.measure(model, (x,), repeat=1).peak_bytes
    assert abs(p.tensor_peak_bytes / measured - 1) < 0.05, (p.tensor_peak_bytes, measured)
    gm = fxsketch.optimize(model, (x,), methods=("lean", "recompute"), **OPTS)
    assert {d.option.value for d in gm.memory_plan.decisions} & {"lean", "recompute"}, gm.memory_plan.summary()
    twin = copy.deepcopy(model)
    _check_like_eager(gm, model, x)  # one step each: BatchNorm statistics updated once, as eager
    twin(x)
    torch.testing.assert_close(model.bn.running_mean, twin.bn.running_mean)
    assert model.bn.num_batches_tracked == twin.bn.num_batches_tracked


def test_recompute_never_replays_a_batch_norm_update_or_the_input_guard():
    model, x = Convs(), torch.randn(4, 3, 16, 16)
    analysis = pipeline.analyse(model, (x,))
    config = fxsketch.Config(methods=("recompute",), **OPTS)
    cands = pipeline.propose(model, analysis, config).candidates.candidates
    assert cands  # segments after the batch norm are offered
    covered = {name for c in cands for name in c.nodes}
    assert not covered & {"batch_norm", "add_", "check_input_shapes"}, covered  # running stats, num_batches_tracked


def test_exported_probe_rewrites_an_aten_conv():
    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 16, 3, padding=1), nn.GELU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 2))
    model, x = Images(convs), torch.randn(8, 3, 32, 32)
    # the rewrite is under test, not the noise bound: any sketch size is admitted
    gm = fxsketch.optimize(model, (x,), 0.8, methods=("probe",), probe_rank=16, calibrate=False,
                           max_grad_noise=1e3, **OPTS)
    assert [d.option.value for d in gm.memory_plan.decisions] == ["probe", "probe"]
    assert sum(n.target is fxsketch.ops.probed_conv for n in gm.graph.nodes) == 2
    torch.testing.assert_close(gm(x), copy.deepcopy(model)(x))
    gm(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # probed dW lands on the model's own


def test_meta_inputs_plan_the_same_via_export():
    model = Convs()
    real = fxsketch.plan(model, (torch.randn(4, 3, 16, 16),))
    meta = fxsketch.plan(model, (torch.empty(4, 3, 16, 16, device="meta"),))
    assert meta.tensor_peak_bytes == real.tensor_peak_bytes


# --------------------------------------------------------------------------------------------
# what export cannot capture either


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value
            return x * 2
        return -x


class WhereGate(nn.Module):  # the fix the error suggests
    def forward(self, x):
        return torch.where(x.sum() > 0, x * 2, -x)


class CondGate(nn.Module):  # torch.export captures torch.cond; fake tensors cannot profile it
    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda t: t * 2, lambda t: -t, (x,))


class Gated(nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.fc1, self.gate, self.fc2 = nn.Linear(8, 8), gate, nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.gate(self.fc1(x))))


def test_value_dependent_branch_names_the_submodule_and_a_fix_that_works():
    x = torch.randn(4, 8)
    with pytest.raises(TraceError) as info:
        fxsketch.plan(Gated(Gate()), (x,))
    msg = str(info.value)
    assert "torch.fx cannot trace module 'gate' (Gate)" in msg
    assert "torch.export cannot capture it either: GuardOnDataDependentSymNode" in msg
    assert "if x.sum() > 0:" in msg and "\n" in msg and msg.count("\n") == 1  # reason, then the fix
    fix = msg.split("Fix: ")[1]
    assert "torch.where" in fix and "would fail there too" in fix  # not the leaf, which fails:
    with pytest.raises(TraceError, match="tensor values"):
        fxsketch.plan(Gated(Gate()), (x,), leaf_modules=(Gate,))
    model = Gated(WhereGate())  # ... while the suggested fix plans
    p = fxsketch.plan(model, (x,))
    assert abs(p.tensor_peak_bytes / fxsketch.measure(model, (x,), repeat=1).peak_bytes - 1) < 0.05


def test_torch_cond_is_refused_with_the_same_fix():
    with pytest.raises(TraceError, match=r"module 'gate' \(CondGate\).*captures it with cond .*fake tensors"
                                         r"(.|\n)*torch.where"):
        fxsketch.plan(Gated(CondGate()), (torch.randn(4, 8),))


def test_value_dependent_top_level_is_not_told_to_make_itself_a_leaf():
    class Top(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(TraceError) as info:
        fxsketch.plan(Top(), (torch.randn(2, 4),))
    assert "the top-level model (Top)" in str(info.value) and "leaf_modules=(Top,)" not in str(info.value)


# --------------------------------------------------------------------------------------------
# a torchvision ViT behind a wrapper fx cannot trace


class Images(nn.Module):
    """Accepts one image or a batch: shape-dependent Python at the top, which fx cannot trace."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return self.net(x)


def test_vit_plans_within_five_percent_and_optimizes_via_export():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    # vit_b_16() fixes patch_size=16: the class takes the small configuration
    vit = tv.models.vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                         hidden_dim=32, mlp_dim=64, num_classes=10)
    model, x = Images(vit), torch.randn(2, 3, 32, 32)
    p = fxsketch.plan(model, (x,))
    assert any("torch.export" in n for n in p.notes)
    measured = fxsketch.measure(model, (x,), repeat=1).peak_bytes
    assert abs(p.tensor_peak_bytes / measured - 1) < 0.05, (p.tensor_peak_bytes, measured)
    gm = fxsketch.optimize(model, (x,), **OPTS)
    _check_like_eager(gm, model, x)


def test_planning_an_exported_model_leaves_it_alone():
    torch.manual_seed(0)
    model = nn.Sequential(Convs(), nn.Dropout(0.5)).train()
    x = torch.randn(4, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    training, rng = [m.training for m in model.modules()], torch.get_rng_state()
    fxsketch.plan(model, (x,))
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
