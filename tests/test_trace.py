"""passes/trace.py and the checks plan() runs before it: errors that say what, where and what to do;
leaf_modules; and that planning leaves the user's model exactly as it was."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.passes.trace import InputError, TraceError, check_inputs, trace


def mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


class DimGate(nn.Module):
    """Python control flow on a tensor property: fx cannot trace it, a fake tensor can run it."""

    def forward(self, x):
        if x.dim() == 2:
            return torch.relu(x) * 2
        return x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), DimGate(), nn.Linear(4, 2))

    def forward(self, x):
        return self.block(x)


# --------------------------------------------------------------------------------------------
# bad model / bad inputs


@pytest.mark.parametrize("model", [lambda x: x * 2, torch.randn(3), "resnet18"])
def test_not_a_module_is_a_type_error(model):
    with pytest.raises(TypeError, match="needs a torch.nn.Module.*wrap a function"):
        fxsketch.plan(model, (torch.randn(2, 4),))


@pytest.mark.parametrize("inputs, pattern", [
    ("x", r"non-empty tuple of tensors.*got str"),
    ({"x": torch.randn(2, 4)}, r"non-empty tuple of tensors.*got dict"),
    ((), r"non-empty tuple of tensors.*got tuple"),
    ((torch.randn(2, 4), 3), r"example_inputs\[1\] is a int, not a tensor"),
    ((None,), r"example_inputs\[0\] is a NoneType"),
])
def test_inputs_must_be_a_tuple_of_tensors(inputs, pattern):
    with pytest.raises(InputError, match=pattern):
        fxsketch.plan(mlp(), inputs)


def test_input_error_is_still_a_type_error():
    # callers that catch TypeError for bad arguments keep working
    assert issubclass(InputError, TypeError)


def test_single_tensor_and_list_are_accepted_as_one_tuple():
    x = torch.randn(2, 4)
    assert check_inputs(mlp(), x) == (x,)
    assert check_inputs(mlp(), [x]) == (x,)
    assert fxsketch.plan(mlp(), x).peak_bytes == fxsketch.plan(mlp(), (x,)).peak_bytes


def test_wrong_number_of_inputs_names_the_arguments():
    with pytest.raises(InputError, match=r"Sequential.forward takes 1 tensor argument\(s\) "
                                         r"\(input\) but 2 example input\(s\) were given"):
        fxsketch.plan(mlp(), (torch.randn(2, 4), torch.randn(2, 4)))


def test_optional_arguments_may_be_left_out():
    class WithDefault(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, scale=None):
            return self.fc(x)

    fxsketch.plan(WithDefault(), (torch.randn(2, 4),))
    with pytest.raises(InputError, match=r"takes 1-2 tensor argument\(s\) \(x, scale\) but 3"):
        fxsketch.plan(WithDefault(), (torch.randn(2, 4),) * 3)


def test_wrong_shape_names_the_node_and_module():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(InputError, match=r"node '_2' \(module '2'\) failed.*16"):
        fxsketch.plan(model, (torch.randn(2, 4),))


def test_input_error_carries_no_fx_boilerplate():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(InputError) as info:
        fxsketch.plan(model, (torch.randn(2, 4),))
    assert "Original traceback" not in str(info.value) and "tlparse" not in str(info.value)


def test_wrong_shape_in_a_nested_module():
    with pytest.raises(InputError, match=r"the example inputs do not fit the model: node "
                                         r"'block_0' \(module 'block.0'\)"):
        fxsketch.plan(Gated(), (torch.randn(2, 5),), leaf_modules=(DimGate,))


# --------------------------------------------------------------------------------------------
# untraceable models


def test_a_module_fx_cannot_trace_is_captured_by_export_and_the_plan_says_why():
    # DimGate branches on x.dim(): fx cannot trace it, torch.export can (tests/test_export.py)
    plan = fxsketch.plan(Gated(), (torch.randn(2, 4),))
    note = next(n for n in plan.notes if n.startswith("captured with torch.export"))
    assert "module 'block.1' (DimGate)" in note


def test_untraceable_top_level_model():
    class Top(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # a branch on values: neither fx nor export

    with pytest.raises(TraceError, match=r"the top-level model \(Top\)") as info:
        trace(Top(), (torch.randn(2, 4),))
    assert isinstance(info.value.__cause__, Exception)  # the fx error is kept as the cause


def test_leaf_modules_makes_it_plan():
    model, x = Gated(), torch.randn(2, 4)
    gm = trace(model, (x,), leaf_modules=(DimGate,))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["block.0", "block.1", "block.2"]
    p = fxsketch.plan(model, (x,), leaf_modules=(DimGate,))
    measured = fxsketch.measure(model, (x,), repeat=1).peak_bytes
    assert abs(p.peak_bytes / measured - 1) < 0.05, (p.peak_bytes, measured)


def test_value_dependent_leaf_module_is_not_blamed_on_the_inputs():
    class ValueGate(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    model = nn.Sequential(nn.Linear(4, 4), ValueGate())
    with pytest.raises(TraceError, match="tensor values"):
        fxsketch.plan(model, (torch.randn(2, 4),), leaf_modules=(ValueGate,))


def test_trace_shares_parameters_with_the_model():
    model = mlp()
    gm = trace(model, (torch.randn(2, 4),))
    assert gm.get_submodule("0").weight is model[0].weight


# --------------------------------------------------------------------------------------------
# plan() leaves the model alone


class Everything(nn.Module):
    """BatchNorm (running stats, num_batches_tracked), dropout (RNG), a plain tensor buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.fc(h.mean((2, 3))) * self.scale


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "ids": {k: id(v) for k, v in [*model.named_parameters(), *model.named_buffers()]},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_grads", [False, True])
def test_plan_does_not_mutate_the_model(training, with_grads):
    torch.manual_seed(0)
    model = Everything().train(training)
    x = torch.randn(4, 3, 8, 8)
    if with_grads:  # grads left from an earlier step must survive, not be added to or cleared
        model(x).sum().backward()
    before = _snapshot(model)
    rng = torch.get_rng_state()
    x_before = x.clone()

    fxsketch.plan(model, (x,))

    after = _snapshot(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert after["ids"] == before["ids"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k  # running_mean/var, num_batches_tracked too
    for k, g in before["grads"].items():
        assert (after["grads"][k] is None) == (g is None), k
        if g is not None:
            assert torch.equal(after["grads"][k], g), k
    assert torch.equal(x, x_before) and x.grad is None


def test_plan_does_not_mutate_an_input_that_requires_grad():
    x = torch.randn(2, 4, requires_grad=True)
    fxsketch.plan(mlp(), (x,))
    assert x.grad is None and x.grad_fn is None


def test_untraceable_top_level_model_is_not_told_to_make_itself_a_leaf():
    class Top(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(TraceError) as info:
        fxsketch.plan(Top(), (torch.randn(2, 4),))
    assert "leaf_modules=(Top,)" not in str(info.value)
    assert "torch.where" in str(info.value)  # a fix that works on fake tensors
