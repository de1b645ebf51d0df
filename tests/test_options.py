"""The option registry: a new kind is one class in one file — here, registered from this test file.

The test-only kind replaces ``nn.GELU`` (which saves its fp32 input) by an op that saves that
input in bfloat16: half the bytes, an approximate gradient. Nothing else in fxsketch knows of it.
"""
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch.passes import options
from fxsketch.passes.options import Candidate, OptionKind, register
from fxsketch.passes.solve import Choice, Span


class _GeluBf16Saved(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x.to(torch.bfloat16))
        return F.gelu(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(g)
        for xs, gs, out in zip(x.split(8), g.split(8), dx.split(8)):  # small temporaries
            xf = xs.float()
            cdf = 0.5 * (1 + torch.erf(xf * 0.7071067811865476))
            pdf = torch.exp(-0.5 * xf * xf) * 0.3989422804014327
            torch.mul(gs, cdf + xf * pdf, out=out)
        return dx


def gelu_bf16_saved(x):
    return _GeluBf16Saved.apply(x)


class GeluHalf(OptionKind):
    name = "gelu_half"

    def node_choices(self, ctx, n):
        if not isinstance(ctx.module(n), nn.GELU):
            return
        drops = tuple((ctx.saved_index[s], n.name) for s in ctx.own_saved(n))
        if drops:
            half = sum(ctx.saved[ctx.saved_index[s]].nbytes for s in ctx.own_saved(n)) // 2
            yield (Choice(n.name, ctx.cost.fraction(0.1 * ctx.cost.seconds[n.name]), 0.0, drops=drops,
                          adds=(Span(half, ctx.fwd[n.name], ctx.bwd[n.name]),)),
                   Candidate(self.name, (n.name,), {}, "GELU input saved in bf16"))

    def rewrite(self, rw, cand):
        n = rw.by_name[cand.nodes[0]]
        with rw.graph.inserting_before(n):
            new = rw.graph.call_function(gelu_bf16_saved, (n.args[0],))
        return rw.replace(n, new)


@pytest.fixture
def gelu_half():
    register(GeluHalf)
    yield
    options.unregister("gelu_half")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 512), nn.GELU(), nn.Linear(512, 4))  # activations dominate


def test_a_kind_registered_from_a_test_file_plans_rewrites_and_trains(gelu_half):
    model, x = mlp(), torch.randn(256, 16)
    gm = fxsketch.optimize(model, (x,), methods=("gelu_half",), max_overhead=1.0)
    plan = gm.memory_plan
    (d,) = plan.decisions
    assert d.option is fxsketch.Option("gelu_half") and d.rewritten == "gelu_bf16_saved"
    assert d.freed_bytes > 0 and plan.peak_bytes < plan.baseline_peak_bytes
    assert [r.option for r in plan.rows if r.name == "gelu_bf16_saved"] == ["gelu_half"]
    torch.testing.assert_close(gm(x), model(x))                       # forward exact
    measured = fxsketch.measure(gm, (x,), repeat=1).peak_bytes
    assert abs(plan.peak_bytes / measured - 1) < 0.02, (plan.peak_bytes, measured)
    gm(x).sum().backward()                                            # it trains
    assert all(p.grad is not None for p in model.parameters())


def test_kinds_are_off_unless_asked_for_and_unknown_ones_are_refused(gelu_half):
    assert "gelu_half" in options.registered() and "gelu_half" not in options.default_methods()
    gm = fxsketch.optimize(mlp(), (torch.randn(256, 16),), max_overhead=1.0, calibrate=False)
    assert all(d.option is not fxsketch.Option("gelu_half") for d in gm.memory_plan.decisions)
    options.unregister("gelu_half")
    with pytest.raises(fxsketch.ConfigError, match="unknown method.*gelu_half"):
        fxsketch.Config(methods=("gelu_half",))


def test_builtin_kinds_are_registered_in_offer_order():
    assert list(options.registered())[:3] == ["probe", "lean", "recompute"]
    assert fxsketch.Config().methods[:3] == ("probe", "lean", "recompute")
    assert "offload" in fxsketch.Config().methods  # a default method, offered on CUDA only (passes/options/offload.py)
    assert isinstance(options.get("probe"), OptionKind)
    with pytest.raises(KeyError, match="no option kind 'nope'"):
        options.get("nope")


def test_rewritten_nodes_show_their_option_in_the_node_table():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 32 * 32, 4))
    # tensor bytes only: with oneDNN's workspace the peak is a conv backward no option here moves
    gm = fxsketch.optimize(model, (torch.randn(16, 3, 32, 32),), methods=("probe", "lean"), probe_rank=4,
                           max_overhead=10.0, workspace="off", memory_format="preserve")
    plan = gm.memory_plan
    shown = {r.name: r.option for r in plan.rows}
    for d in plan.decisions:
        assert shown[d.rewritten].startswith(d.option.value)
        if d.option is fxsketch.Option.PROBE:
            assert shown[d.rewritten] == "probe r=4"
    assert sum(opt != "keep" for opt in shown.values()) == len(plan.decisions) > 0
    assert isinstance(gm, fx.GraphModule)


def test_freed_bytes_are_read_off_the_verified_graph():
    # what each choice keeps out of the verified peak step; undoing it would put those bytes back
    # at that step, so the unmodified peak is at least the optimized peak plus any one of them
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 32 * 32, 4))
    plan = fxsketch.optimize(model, (torch.randn(16, 3, 32, 32),), methods=("lean",), max_overhead=10.0,
                             calibrate=False, workspace="off", memory_format="preserve").memory_plan
    assert plan.decisions
    for d in plan.decisions:
        assert 0 <= d.freed_bytes and plan.peak_bytes + d.freed_bytes <= plan.baseline_peak_bytes
    assert any(d.freed_bytes > 0 for d in plan.decisions)


class _EveryOp(nn.Module):
    """Calls each op a rewrite inserts as a call_function node, in-place lean ReLUs included."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(8, 3, 3, 3)), nn.Parameter(torch.randn(8, 8, 3, 3))
        self.fc = nn.Linear(8, 4)
        self.bn, self.gn, self.inorm = nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.InstanceNorm2d(8, affine=True)

    def forward(self, x):
        from fxsketch import ops
        x = ops.quant_batch_norm(ops.probed_conv(x, self.w1, padding=1, rank=4), self.bn.running_mean,
                                 self.bn.running_var, self.bn.weight, self.bn.bias, True, bits=8)
        x = ops.lean_max_pool(ops.lean_relu(x, inplace=True), 2)
        x = F.conv2d(x, self.w2, padding=1)
        x = ops.lean_leaky_relu(ops.quant_group_norm(x, 2, self.gn.weight, self.gn.bias, bits=4), inplace=True)
        x = ops.quant_instance_norm(x, None, None, self.inorm.weight, self.inorm.bias, bits=8)
        x = ops.quant_layer_norm(x.mean((2, 3)), [8], bits=8)
        return ops.aop_linear(x, self.fc.weight, self.fc.bias, k=1.0)


def test_every_inserted_op_survives_torch_save_and_load():
    """fx re-traces a GraphModule's code when it is unpickled: each op comes back as its own node
    (an in-place lean ReLU's autograd.Function cannot run on proxies) and computes the same."""
    import io
    torch.manual_seed(0)
    gm = fx.symbolic_trace(_EveryOp())
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in back.graph.nodes if n.op == "call_function"] == targets
    x = torch.randn(4, 3, 8, 8)
    for m in (gm, back):
        torch.manual_seed(1)
        out = m(x)
        out.sum().backward()
    torch.manual_seed(1)
    assert torch.equal(back(x), gm(x))
    for p, q in zip(gm.parameters(), back.parameters()):
        assert torch.equal(p.grad, q.grad)
