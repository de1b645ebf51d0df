"""Ops written into an input nothing else reads (passes/inplace.py): adds, and quantized norms
that normalize their input in place (fxsketch.ops.quant)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch import ops
from fxsketch.measurement import measure
from fxsketch.passes.inplace import inplace_ops


@pytest.mark.parametrize("channels_last", [False, True])
def test_an_in_place_quantized_batch_norm_is_torchs_within_rounding(channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(8, 3, 10, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    stats = [(torch.zeros(4), torch.ones(4)) for _ in range(3)]
    y0 = F.batch_norm(conv(x), *stats[0], w, b, True, 0.1, 1e-5)
    y1 = ops.quant_batch_norm(conv(x), *stats[1], w, b, True, 0.1, 1e-5, bits=8,
                              generator=torch.Generator().manual_seed(1))
    h = conv(x)
    y2 = ops.quant_batch_norm(h, *stats[2], w, b, True, 0.1, 1e-5, bits=8,
                              generator=torch.Generator().manual_seed(1), inplace=True)
    assert y2.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()  # written over its input
    torch.testing.assert_close(y2, y0, rtol=1e-6, atol=1e-6)
    for a, c in zip(stats[0], stats[2]):
        assert torch.equal(a, c)  # the running statistics are torch's own update
    r = torch.randn_like(y0)
    g1 = torch.autograd.grad((y1 * r).sum(), [w, b, conv.weight])
    g2 = torch.autograd.grad((y2 * r).sum(), [w, b, conv.weight])
    for p, q in zip(g2, g1):  # the same codes: the out-of-place op's gradients
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_in_place_is_left_out_in_eval_mode_and_off_fp32():
    bn = nn.BatchNorm2d(4).eval()
    x = torch.randn(2, 4, 5, 5)
    y = ops.quant_norm_module(x, bn, inplace=True)
    assert y.data_ptr() != x.data_ptr() and torch.equal(y, bn(x))  # running statistics: torch's kernel
    bn.train()
    xh = x.double()
    bn.double()
    y = ops.quant_norm_module(xh, bn, inplace=True)
    assert y.data_ptr() != xh.data_ptr()


class Block(nn.Module):
    """A residual block as torchvision writes it (``out += identity``), and a norm whose input
    is read twice."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x                           # traced as an out-of-place add
        h = self.conv3(out)
        return torch.relu(self.bn3(h) + h.mean())   # h read twice: its norm stays out of place


def _rewritten(model, x, methods):
    gm = fxsketch.optimize(model, (x,), methods=methods, max_overhead=10.0, max_grad_noise=10.0, seed=0,
                           progress=False, time_nodes=False, memory_format="preserve")
    return gm, [n for g in [gm, *(m.segment for m in gm.modules() if hasattr(m, "segment"))] for n in g.graph.nodes]


def test_the_pass_writes_only_into_tensors_nothing_else_reads():
    torch.manual_seed(0)
    model, x = Block(), torch.randn(4, 8, 16, 16)
    gm, nodes = _rewritten(model, x, ("quant", "lean"))
    norms = [n for n in nodes if n.target is ops.quant_norm_module]
    assert norms
    for n in norms:  # in place exactly where the input is a conv's output read by the norm alone
        assert n.kwargs.get("inplace", False) == (len(n.args[0].users) == 1), n.format_node()
    adds = [n for n in nodes if n.op == "call_method" and n.target == "add_"]
    assert len(adds) >= 1 and all(a.args[0].op != "placeholder" for a in adds)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    plan = gm.memory_plan
    got = measure(gm, (x,))
    assert abs(plan.tensor_peak_bytes / got.peak_bytes - 1) < 0.02, (plan.tensor_peak_bytes, got.peak_bytes)


def test_a_replayed_segment_never_writes_into_its_inputs():
    # a replay keeps its inputs for the backward: the first node of a segment must not write into them
    torch.manual_seed(0)
    model, x = Block(), torch.randn(4, 8, 16, 16)
    gm, _ = _rewritten(model, x, ("quant", "lean", "recompute"))
    segments = [m.segment for m in gm.modules() if hasattr(m, "segment")]
    assert segments
    for seg in segments:
        for n in seg.graph.nodes:
            if n.op == "call_method" and n.target == "add_" or n.kwargs.get("inplace"):
                assert n.args[0].op != "placeholder", n.format_node()
    xe, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    r = torch.randn(4, 8, 16, 16)
    (model(xe) * r).sum().backward()
    (gm(xg) * r).sum().backward()
    assert (xg.grad - xe.grad).norm() < 0.2 * xe.grad.norm()  # quantized norms: close, not equal


def test_adds_that_broadcast_or_read_graph_inputs_stay_out_of_place():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

        def forward(self, x):
            small = self.conv(x).mean((2, 3), keepdim=True)
            return (small + self.conv(x)) + x, self.conv(x) + x    # into the convs' outputs (and sums) only

    from fxsketch.pipeline import analyse
    model, x = Net(), torch.randn(2, 3, 4, 4)
    gm = analyse(model, (x,)).gm
    assert inplace_ops(gm) == 3
    inplace = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "add_"]
    # the small mean is added into a conv's output, x never written into
    assert [n.args[0].op for n in inplace] == ["call_module", "call_method", "call_module"]
    assert all(n.args[0].op != "placeholder" for n in inplace)
    for a, b in zip(gm(x), model(x)):
        assert torch.equal(a, b)
