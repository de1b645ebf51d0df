"""Quantized norm inputs: exact outputs, approximate gradients within the stated error, and only
the codes (plus a scale and zero point per group) saved for backward."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import fxsketch
from fxsketch.errors import UnsupportedError
from fxsketch.ops import quant as q
from fxsketch.quant_noise import QuantPrior, norm_noise_terms


def _cases(kind, x, w, b, bits, **kw):
    """(eager, quantized) forms of one norm call on x."""
    if kind == "batch":
        return (lambda t: F.batch_norm(t, None, None, w, b, True),
                lambda t: q.quant_batch_norm(t, None, None, w, b, True, bits=bits, **kw))
    if kind == "group":
        return (lambda t: F.group_norm(t, 2, w, b), lambda t: q.quant_group_norm(t, 2, w, b, bits=bits, **kw))
    if kind == "instance":
        return (lambda t: F.instance_norm(t, weight=w, bias=b),
                lambda t: q.quant_instance_norm(t, None, None, w, b, bits=bits, **kw))
    ns = list(x.shape[-1:])
    return (lambda t: F.layer_norm(t, ns, w, b), lambda t: q.quant_layer_norm(t, ns, w, b, bits=bits, **kw))


def _grads(fn, x, w, b, dy):
    x = x.detach().requires_grad_()
    y = fn(x)
    return (y,) + torch.autograd.grad(y, (x, w, b), dy)


def _noise_kw(kind, w):
    return dict(kind=kind, weight=w, num_groups=2, normalized_dims=1)


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["batch", "group", "instance", "layer"]), bits=st.sampled_from([8, 4]),
       n=st.integers(2, 4), c=st.sampled_from([2, 4]), p=st.integers(1, 9), scale=st.floats(0.1, 100.0))
def test_output_is_eager_bit_for_bit_and_gradients_within_the_stated_error(kind, bits, n, c, p, scale):
    torch.manual_seed(n * 100 + p)
    x = torch.randn(n, c, p, 3) * scale + 3.0
    w, b = torch.randn(x.shape[-1] if kind == "layer" else c, requires_grad=True), None
    b = torch.randn_like(w).requires_grad_()
    dy = torch.randn(x.shape)
    eager, quant = _cases(kind, x, w, b, bits)
    ye, dxe, dwe, dbe = _grads(eager, x, w, b, dy)
    yq, dxq, dwq, dbq = _grads(quant, x, w, b, dy)
    assert torch.equal(yq, ye)                                    # exact forward
    torch.testing.assert_close(dbq, dbe)                          # dbeta does not read X
    terms = norm_noise_terms(x, dy, **_noise_kw(kind, w))
    # dgamma: every element is rounded by less than one step, and E||error||^2 is the closed form
    assert float((dwq - dwe).pow(2).sum()) <= 30 * terms.weight_err[bits] + 1e-6 * float(dwe.pow(2).sum())
    assert float((dxq - dxe).pow(2).sum()) <= 30 * terms.dx_err[bits] + 1e-4 * float(dxe.pow(2).sum()) + 1e-8


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(bits):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 50) * 2
    gen = torch.Generator().manual_seed(1)
    draws = 400
    total = torch.zeros_like(x)
    for _ in range(draws):
        codes, lo, step = q.quantize(x, bits, generator=gen)
        total += q.dequantize(codes, lo, step, bits, x.shape)
    err = total / draws - x
    sd = step.expand_as(x) / 2 / math.sqrt(draws)                 # f(1-f) <= 1/4
    assert float((err.abs() / sd).max()) < 5                      # each element, 5 standard errors
    assert abs(float((err / sd).mean())) < 5 / math.sqrt(x.numel())  # and on average: no bias


def test_weight_gradient_is_unbiased_and_error_matches_the_closed_form():
    torch.manual_seed(0)
    x, dy = torch.randn(4, 3, 6, 6) + 1, torch.randn(4, 3, 6, 6)
    w, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    eager, quant = _cases("batch", x, w, b, 4, generator=torch.Generator().manual_seed(0))
    _, dxe, dwe, _ = _grads(eager, x, w, b, dy)
    runs = [_grads(quant, x, w, b, dy) for _ in range(300)]
    dw = torch.stack([r[2] for r in runs])
    dx = torch.stack([r[1] for r in runs])
    terms = norm_noise_terms(x, dy, **_noise_kw("batch", w))
    mse_w = float((dw - dwe).pow(2).sum(1).mean())
    assert 0.8 < mse_w / terms.weight_err[4] < 1.25               # closed form vs 300 draws
    sem = (dw - dwe).std(0) / math.sqrt(len(runs))
    assert float(((dw.mean(0) - dwe).abs() / sem).max()) < 5      # unbiased
    mse_x = float((dx - dxe).pow(2).flatten(1).sum(1).mean())
    assert 0.7 < mse_x / terms.dx_err[4] < 1.4                    # first-order dX error


@pytest.mark.parametrize("bits,fraction", [(8, 4), (4, 8)])
def test_saves_the_codes_and_one_scale_and_zero_point_per_group(bits, fraction):
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    bn = nn.BatchNorm2d(8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q.quant_norm_module(x, bn, bits=bits)
    stats = {id(t) for t in (bn.weight, bn.bias)}
    big = [t for t in saved if id(t) not in stats and t.numel() > 8]
    codes, lo, step = big
    assert codes.dtype == torch.uint8 and codes.nbytes * fraction == x.numel() * 4
    assert lo.shape == step.shape == (4, 8, 1, 1) and lo.dtype == torch.float32
    assert q.quant_nbytes(x.shape, bits, q.quant_groups(x.shape, "batch")) == codes.nbytes + lo.nbytes + step.nbytes
    assert not any(t.shape == x.shape and t.is_floating_point() for t in saved)  # X itself is not saved
    assert sum(t.nbytes for t in saved if all(t is not u for u in big)) == 4 * 4 * 8  # weight, bias, mean, rstd


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 16 * 16, 4))


def test_planned_peak_matches_the_measured_one_and_training_is_reproducible():
    model, x = _net(), torch.randn(16, 3, 16, 16)
    gm = fxsketch.optimize(model, (x,), methods=("quant", "lean"), max_overhead=10.0, workspace="off", seed=0,
                           memory_format="preserve")  # bitwise-exact forward against eager
    plan = gm.memory_plan
    assert any(d.option.value == "quant" for d in plan.decisions)
    measured = fxsketch.measure(gm, (x,), repeat=1).peak_bytes
    assert abs(plan.peak_bytes / measured - 1) < 0.01, (plan.peak_bytes, measured)
    assert plan.peak_bytes < plan.baseline_peak_bytes
    # train mode, batch statistics: exact but for the in-place norms' fp32 rounding (passes/inplace.py)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    assert all(d.grad_noise <= fxsketch.Config().max_grad_noise for d in plan.decisions)
    again = fxsketch.optimize(_net(), (x,), methods=("quant", "lean"), max_overhead=10.0, workspace="off", seed=0,
                              memory_format="preserve")
    gm.fxsketch_rng.manual_seed(0)                                # rewind the draws measure() and gm(x) made
    g1 = torch.autograd.grad(gm(x).sum(), list(model.parameters()))
    g2 = torch.autograd.grad(again(x).sum(), list(again.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))         # seed=: the same draws


def test_calibrated_levels_are_offered_per_bit_width_in_one_group():
    from fxsketch.pipeline import analyse, propose
    model, x = _net(), torch.randn(8, 3, 16, 16)
    config = fxsketch.Config(methods=("quant",), workspace="off")
    proposal = propose(model, analyse(model, (x,)), config)
    quant = [(ch, c) for ch, c in zip(proposal.every.problem.choices, proposal.every.candidates) if c.kind == "quant"]
    by_node = {}
    for ch, c in quant:
        by_node.setdefault(ch.group, {})[c.params["bits"]] = ch.noise
    assert by_node and all(set(v) == {8, 4} for v in by_node.values())
    for levels in by_node.values():
        assert 0 < levels[8] < levels[4] < 2                      # 16x finer steps: ~16x less noise
        assert 10 < levels[4] / levels[8] < 20
    assert any("quantized-norm noise" in n for n in proposal.notes)


def test_prior_falls_with_bits_and_grows_slowly_with_the_group():
    p = QuantPrior(64 * 64)
    assert p.ratio(4) / p.ratio(8) == pytest.approx(255 / 15)
    assert QuantPrior(1 << 20).ratio(4) < 1.3 * p.ratio(4) and not p.calibrated


def test_other_norm_forms_and_eval_mode_match_eager():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, requires_grad=True)
    for m in (nn.GroupNorm(2, 4), nn.LayerNorm(5), nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
              nn.BatchNorm1d(4).eval(), nn.BatchNorm1d(4, momentum=None)):
        twin = copy.deepcopy(m)
        assert torch.equal(q.quant_norm_module(x, m, bits=8), twin(x)), type(m).__name__
        for a, b in zip(m.buffers(), twin.buffers()):
            assert torch.equal(a, b), type(m).__name__               # running statistics updated alike


def test_custom_ops_pass_opcheck_and_run_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = torch.randn(3, 4, 5)
    for bits in (8, 4):
        torch.library.opcheck(torch.ops.fxsketch.quant_pack.default, (x, torch.tensor(7), bits, [3, 4, 1]))
        codes, lo, step = torch.ops.fxsketch.quant_pack(x, torch.tensor(7), bits, [3, 4, 1])
        torch.library.opcheck(torch.ops.fxsketch.quant_unpack.default, (codes, lo, step, bits, [3, 4, 5], torch.float32))
    with FakeTensorMode():
        xf = torch.randn(2, 4, 6, 6, requires_grad=True)
        y = q.quant_group_norm(xf, 2, bits=4)
        (dx,) = torch.autograd.grad(y.sum(), xf)
    assert y.shape == dx.shape == (2, 4, 6, 6)


def test_bad_input_is_named():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="bits must be one of"):
        q.quant_batch_norm(x, None, None, training=True, bits=3)
    with pytest.raises(TypeError, match="floating-point"):
        q.quant_layer_norm(torch.ones(2, 3, dtype=torch.int64), (3,))
    with pytest.raises(ValueError, match="divisible by num_groups=3"):
        q.quant_group_norm(x, 3)
    with pytest.raises(ValueError, match="normalized_shape"):
        q.quant_layer_norm(x, (4,))
    with pytest.raises(TypeError, match="got Linear"):
        q.quant_norm_module(x, nn.Linear(3, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        q.quant_batch_norm(torch.randn(1, 4), None, None, training=True)
    y = q.quant_batch_norm(x.requires_grad_(), None, None, training=True)
    with pytest.raises(UnsupportedError, match="double backward"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_strided_input_is_quantized_in_its_logical_order(bits):
    # a transposed activation (attention's (B, T, C) from (T, B, C)) reaches a LayerNorm strided
    torch.manual_seed(0)
    x = torch.randn(17, 2, 32).transpose(0, 1).requires_grad_()
    assert not x.is_contiguous()
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    y = q.quant_layer_norm(x, (32,), w, b, bits=bits)
    assert torch.equal(y, F.layer_norm(x, (32,), w, b))
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w), gy)
    want = torch.autograd.grad(F.layer_norm(x, (32,), w, b), (x, w), gy)
    for g, e in zip(got, want):  # dequantized X: close to eager's, nowhere permuted
        assert (g - e).norm() < (0.05 if bits == 8 else 0.5) * e.norm()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape, groups", [((3, 5, 40), None), ((2, 3, 301), None), ((4, 3, 7, 7), None),
                                           ((3, 5, 7), None), ((37, 6), [1, 6])])
def test_packing_in_blocks_rounds_to_a_neighbour_unbiased_within_its_workspace(monkeypatch, bits, shape, groups):
    """The packing runs in blocks of q.BLOCK elements (rows, pieces of a row, or the whole tensor
    where the groups are not its leading dims or 4-bit rows are odd): each code is the grid point
    below or above X, the mean of many draws is X, and it allocates its stated workspace."""
    from fxsketch.measurement import LiveStorageTracker
    monkeypatch.setattr(q, "BLOCK", 64)
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1
    groups = q.quant_groups(shape, "batch") if groups is None else groups
    total, draws = torch.zeros(shape, dtype=torch.float64), 300
    for k in range(draws):
        with LiveStorageTracker([x]) as tr:
            codes, lo, step = q.quant_pack(x, torch.tensor(k), bits, groups)
        if k == 0:
            outputs = codes.nbytes + lo.nbytes + step.nbytes
            assert outputs <= tr.peak_bytes - x.nbytes <= outputs + q.pack_workspace_nbytes(shape, bits, groups) + 8 * lo.numel()
        y = q.dequantize(codes, lo, step, bits, shape)
        pos, got = (x - lo) / step, (y - lo) / step
        assert torch.all((got - pos.floor() > -1e-3) & (got - pos.floor() < 1 + 1e-3)), k
        assert codes.max() <= 2 ** bits - 1 or bits == 4
        total += y
    sigma = (step / 2 / math.sqrt(draws)).expand(shape).double()
    assert torch.all((total / draws - x).abs() <= 5 * sigma + 1e-5)
    half = q.dequantize(codes, lo, step, bits, shape, torch.float16)
    assert torch.equal(half, q.dequantize(codes, lo, step, bits, shape).half())  # computed in fp32, then cast


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind, shape, train", [
    ("batch", (10, 6, 7, 5), True), ("batch", (10, 6, 7, 5), False), ("batch", (64, 6), True),
    ("batch", (1, 6, 9, 8), True), ("instance", (3, 6, 5, 4, 4), True), ("group", (9, 4, 5, 5), True),
    ("layer", (11, 7, 6), True)])
def test_backward_reads_x_a_chunk_at_a_time_and_equals_the_whole_x_backward(monkeypatch, bits, kind, shape, train):
    """The torch path's backward dequantizes X in chunks of the batch (of the channels, batch 1):
    its gradients are those of the backward that dequantizes X whole (same codes), and beside dY
    and dX it holds backward_workspace_nbytes (a chunk of X, and of dX), not all of X. (The fused
    CPU loops read no dequantized X at all: tests/test_cpu_kernels.py.)"""
    from fxsketch.measurement import LiveStorageTracker
    monkeypatch.setenv("FXSKETCH_CPU_KERNELS", "0")
    monkeypatch.setattr(q, "BACKWARD_MIN_ELEMENTS", 0)  # chunks at these small shapes too
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 1
    c = shape[-1] if kind == "layer" else shape[1]
    w, b = torch.randn(c, requires_grad=True), torch.randn(c, requires_grad=True)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    fn = {"batch": lambda t: q.quant_batch_norm(t, rm.clone(), rv.clone(), w, b, train, bits=bits),
          "instance": lambda t: q.quant_instance_norm(t, None, None, w, b, bits=bits),
          "group": lambda t: q.quant_group_norm(t, 2, w, b, bits=bits),
          "layer": lambda t: q.quant_layer_norm(t, [c], w, b, bits=bits)}[kind]
    dy = torch.randn(shape)

    def run():
        torch.manual_seed(1)  # the same codes
        t, saved = x.clone().requires_grad_(), []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
            y = fn(t)
        with LiveStorageTracker([t, w, b, dy] + saved) as tr:
            grads = torch.autograd.grad(y, (t, w, b), dy)
        return grads, tr.peak_bytes - tr.resident_bytes - sum(g.nbytes for g in grads)
    view = (1, shape[0] * shape[1], *shape[2:]) if kind == "instance" else shape
    op_kind, k = "batch" if kind == "instance" else kind, 1 if kind == "layer" else 0
    assert q.backward_chunks(op_kind, view, bits, k) is not None
    stated = q.backward_workspace_nbytes(op_kind, view, bits, q.quant_groups(view, op_kind, k), normalized_dims=k)
    chunked, held = run()
    monkeypatch.setattr(q, "backward_chunks", lambda *a, **k: None)
    whole, held_whole = run()
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert held <= stated + 256 and held <= held_whole - x.nbytes // 2, (held, stated, held_whole)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("train", [True, False])
def test_channels_last_batch_norm_packs_as_it_lies(monkeypatch, bits, train):
    """A channels_last BatchNorm input is packed in memory order (a scale per sample and channel
    broadcast over its (H, W) rows, in blocks, not one block of the whole tensor nor a copy of X in
    logical order); its backward reads the codes in that layout (the fused CPU loops in training, chunks of
    the dequantized X otherwise): dX comes back channels_last,
    close to eager's, and neither direction holds more than its stated workspace."""
    from fxsketch.measurement import LiveStorageTracker
    from fxsketch.ops._args import memory_order
    monkeypatch.setattr(q, "BLOCK", 1 << 12)
    monkeypatch.setattr(q, "BACKWARD_MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    shape = (6, 8, 10, 14)
    x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=torch.channels_last)
    order = memory_order(x)
    mem_shape = [shape[d] for d in order]
    mem_groups = [q.quant_groups(shape, "batch")[d] for d in order]
    assert order == [0, 2, 3, 1] and not q._layout(mem_shape, mem_groups, bits)[4]  # blocks, not whole
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    rm, rv = torch.randn(8), torch.rand(8) + 0.5
    t, kept = x.clone().requires_grad_(), []
    with LiveStorageTracker([t, w, b]) as tr, \
            torch.autograd.graph.saved_tensors_hooks(lambda s: kept.append(s) or s, lambda s: s):
        y = q.quant_batch_norm(t, rm.clone(), rv.clone(), w, b, train, bits=bits)
    saved = q.quant_nbytes(shape, bits, mem_groups)
    assert tr.peak_bytes - tr.resident_bytes - y.nbytes - saved <= q.pack_workspace_nbytes(mem_shape, bits, mem_groups) + 256
    ref = F.batch_norm(x, rm.clone(), rv.clone(), w, b, train)
    assert torch.equal(y, ref)
    dy = torch.randn_like(x)  # channels_last
    with LiveStorageTracker([t, w, b, dy] + kept) as tr:
        got = torch.autograd.grad(y, (t, w, b), dy)
    held = tr.peak_bytes - tr.resident_bytes - sum(g.nbytes for g in got)
    assert held <= q.backward_workspace_nbytes("batch", shape, bits, mem_groups, order=order, batch_stats=train) + 256, held
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    xe = x.clone().requires_grad_()
    want = torch.autograd.grad(F.batch_norm(xe, rm.clone(), rv.clone(), w, b, train), (xe, w, b), dy)
    for g, e in zip(got, want):
        assert (g - e).norm() < (0.05 if bits == 8 else 0.5) * e.norm()
