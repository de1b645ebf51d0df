"""probed_conv against eager PyTorch: exact output/dX/db, unbiased dW, 1/sqrt(r) error,
what is saved for backward, and seeding."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fxsketch.ops import lean_relu, probed_conv, rank_for_ratio, sketch_nbytes, sketch_shape
from fxsketch.ops.probed import (conv_geometry, dw_channel, dw_spatial, exact_weight_grad, reconstruct,
                                 sketch, tap_indices)
from fxsketch.ops.probes import PROBES

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@st.composite
def conv_cases(draw, max_d=3):
    """A small conv of any dimension, stride, dilation, groups and padding form."""
    d = draw(st.integers(1, max_d))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dilation = draw(st.sampled_from([1, 2, "tuple"]))
    if dilation == "tuple":
        dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
    padding = draw(st.sampled_from([0, 1, "same", "valid", "tuple"]))
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 2, 3, "tuple"]))
    if stride == "tuple":
        stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    if padding == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(d))
    size_max = {1: 11, 2: 7, 3: 5}[d]
    dil = dilation if isinstance(dilation, tuple) else (dilation,) * d
    spatial = tuple(dl * (k - 1) + 1 + draw(st.integers(0, size_max - 3)) for k, dl in zip(kernel, dil))
    n = draw(st.sampled_from([2, 5]))  # 5: dX in batch chunks (fxsketch.ops.probed.DX_CHUNKS)
    return dict(d=d, x_shape=(n, cin) + spatial, w_shape=(cout, cin // groups) + kernel,
                stride=stride, padding=padding, dilation=dilation, groups=groups,
                mode=draw(st.sampled_from(["spatial", "channel"])), probe=draw(st.sampled_from(PROBES)))


def _tensors(case, dtype=torch.float64, bias=True):
    x = torch.randn(case["x_shape"], dtype=dtype, requires_grad=True)
    w = torch.randn(case["w_shape"], dtype=dtype, requires_grad=True)
    b = torch.randn(case["w_shape"][0], dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


def _args(case):
    return case["stride"], case["padding"], case["dilation"], case["groups"]


def _rank(case):
    return max(1, math.prod(case["x_shape"][2:]) // 3)


@settings(max_examples=40, deadline=None)
@given(case=conv_cases(), bias=st.booleans())
def test_output_dx_db_equal_torch(case, bias):
    x, w, b = _tensors(case, bias=bias)
    y = probed_conv(x, w, b, *_args(case), rank=_rank(case), mode=case["mode"], probe=case["probe"])
    ref = CONV[case["d"]](x, w, b, *_args(case))
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    inputs = (x, b) if bias else (x,)
    for got, want in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(got, want)


def test_unbatched_input_and_keyword_forms():
    x, w = torch.randn(3, 10), torch.randn(4, 3, 3, requires_grad=True)
    y = probed_conv(x, w, None, stride=(2,), padding=(1,), dilation=(1,), rank=4)
    torch.testing.assert_close(y, F.conv1d(x, w, None, 2, 1))


@settings(max_examples=25, deadline=None)
@given(case=conv_cases())
def test_sketch_domain_dw_equals_torch_wgrad_on_reconstruction(case):
    """Spatial mode's per-tap scatter is exactly torch's wgrad applied to Xhat = Z Z^T X.

    Deterministic and tight: any slip in the per-axis shift, stride, dilation, padding or
    groups indexing shows up here, without statistics.
    """
    x, w, _ = _tensors(case)
    geo = conv_geometry(case["w_shape"], *_args(case))
    dy = torch.randn_like(CONV[case["d"]](x, w, None, *_args(case))).detach()
    rank, seed = _rank(case), 1234
    xbar = sketch(x.detach(), seed, rank, "spatial", case["probe"])
    got = dw_spatial(dy, xbar, seed, rank, case["probe"], x.shape[2:], w.shape, geo)
    xhat = reconstruct(xbar, seed, rank, "spatial", case["probe"], x.shape)
    torch.testing.assert_close(got, exact_weight_grad(dy.float(), xhat, w.shape, geo).float(),
                               rtol=1e-4, atol=1e-4)
    # Channel mode is torch's wgrad on its own reconstruction, chunked over the batch.
    xbar_c = sketch(x.detach(), seed, 5, "channel", case["probe"])
    xhat_c = reconstruct(xbar_c, seed, 5, "channel", case["probe"], x.shape)
    torch.testing.assert_close(dw_channel(dy, xbar_c, seed, 5, case["probe"], x.shape, w.shape, geo),
                               exact_weight_grad(dy.float(), xhat_c, w.shape, geo).float())


@settings(max_examples=12, deadline=None)
@given(case=conv_cases())
def test_dw_is_unbiased(case):
    """Mean of many dW estimates -> exact dW within 5 standard errors (estimated from the draws)."""
    x, w, b = _tensors(case)
    y_ref = CONV[case["d"]](x, w, b, *_args(case))
    g = torch.randn_like(y_ref)
    exact = torch.autograd.grad(y_ref, w, g)[0]
    rank = max(1, _rank(case))
    draws = torch.stack([
        torch.autograd.grad(probed_conv(x, w, b, *_args(case), rank=rank, mode=case["mode"],
                                        probe=case["probe"]), w, g)[0] for _ in range(200)])
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert ((mean - exact).abs() <= 5 * stderr + 1e-6 * (1 + exact.abs().max())).all()


def test_circular_flattened_shift_would_be_biased():
    """E[estimate] with per-axis shifts and zero fill is exact; a circular shift of the
    flattened image (wrapping rows into each other) is not, by tens of percent."""
    x, w = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    geo = conv_geometry(w.shape, 1, 1, 1, 1)
    dy = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    exact = exact_weight_grad(dy, x, w.shape, geo)
    flat, valid = tap_indices((3, 3), (8, 8), (8, 8), geo)
    x3, dy3 = x.view(2, 3, 64), dy.view(2, 4, 64)
    # Expected estimate = dW computed on E[Xhat] = X, for either indexing rule.
    ours = torch.einsum("nop,nckp->ock", dy3, x3[:, :, flat] * valid).view(w.shape)
    p = torch.arange(64)
    offsets = torch.tensor([(ky - 1) * 8 + (kx - 1) for ky in range(3) for kx in range(3)])
    circular = torch.einsum("nop,nckp->ock", dy3, x3[:, :, (p + offsets[:, None]) % 64]).view(w.shape)
    torch.testing.assert_close(ours, exact)
    assert (circular - exact).norm() / exact.norm() > 0.1


def _smooth_problem(size=32):
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    x = torch.stack([torch.sin(3 * xx + c) + torch.cos(2 * c * yy) for c in range(4)])[None].repeat(2, 1, 1, 1)
    w = torch.randn(4, 4, 3, 3, generator=gen)
    dy = torch.randn(2, 4, size, size, generator=gen)
    geo = conv_geometry(w.shape, 1, 1, 1, 1)
    return x, w, dy, geo, exact_weight_grad(dy, x, w.shape, geo)


def _rms_rel_error(problem, rank, probe, seeds=range(24)):
    x, w, dy, geo, exact = problem
    errs = [float((dw_spatial(dy, sketch(x, s, rank, "spatial", probe), s, rank, probe,
                              x.shape[2:], w.shape, geo) - exact).norm() / exact.norm()) ** 2 for s in seeds]
    return math.sqrt(sum(errs) / len(errs))


@pytest.mark.parametrize("probe", PROBES)
def test_error_falls_like_inverse_sqrt_rank(probe):
    problem = _smooth_problem()
    ranks = [4, 16, 64]
    slope = np.polyfit(np.log(ranks), np.log([_rms_rel_error(problem, r, probe) for r in ranks]), 1)[0]
    assert -0.65 < slope < -0.35


def test_orthogonal_has_lower_variance_than_rademacher_at_high_ratio():
    problem = _smooth_problem(16)
    assert _rms_rel_error(problem, 128, "orthogonal") < _rms_rel_error(problem, 128, "rademacher")


@pytest.mark.parametrize("mode", ["spatial", "channel"])
def test_saves_only_sketch_and_weight(mode):
    x = torch.randn(4, 6, 12, 12, requires_grad=True)
    w = torch.randn(8, 6, 3, 3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = probed_conv(x, w, torch.zeros(8, requires_grad=True), padding=1, rank=9, mode=mode)
    assert len(saved) == 2
    sk, wt = saved
    assert tuple(sk.shape) == sketch_shape(x.shape, 9, mode) and wt.data_ptr() == w.data_ptr()
    assert sum(t.numel() * t.element_size() for t in saved) == \
        sketch_nbytes(x.shape, 9, mode) + w.numel() * 4
    y.sum().backward()


def test_same_seed_same_estimate_and_manual_seed_reproducible():
    x, w = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3, requires_grad=True)

    def dw():
        return torch.autograd.grad(probed_conv(x, w, padding=1, rank=8).sum(), w)[0]

    torch.manual_seed(7)
    a, b = dw(), dw()
    torch.manual_seed(7)
    torch.testing.assert_close(dw(), a, rtol=0, atol=0)
    assert not torch.equal(a, b)  # a fresh seed every step


def test_caller_rng_advanced_by_exactly_one_draw():
    x, w = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3, requires_grad=True)
    torch.manual_seed(3)
    probed_conv(x, w, rank=8).sum().backward()
    after = torch.rand(5)
    torch.manual_seed(3)
    torch.randint(2**31 - 1, ())
    torch.testing.assert_close(after, torch.rand(5), rtol=0, atol=0)


def test_bfloat16_runs_with_fp32_accumulation():
    x = torch.randn(2, 4, 10, 10, dtype=torch.bfloat16)
    w = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    for mode in ("spatial", "channel"):
        y = probed_conv(x, w, padding=1, rank=25, mode=mode)
        (dw,) = torch.autograd.grad(y.float().sum(), w)
        assert dw.dtype == torch.bfloat16 and torch.isfinite(dw.float()).all()


def test_clear_errors():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        probed_conv(x, w, rank=0)
    with pytest.raises(ValueError, match="unknown mode"):
        probed_conv(x, w, rank=2, mode="pixels")
    with pytest.raises(ValueError, match="unknown probe"):
        probed_conv(x, w, rank=2, probe="halton")
    with pytest.raises(ValueError, match="needs input of 4 dims"):
        probed_conv(torch.randn(2, 3, 8, 8, 8), w, rank=2)
    with pytest.raises(ValueError, match="padding string"):
        probed_conv(x, w, rank=2, padding="full")


@pytest.mark.parametrize("mode", ["spatial", "channel"])
def test_chunked_paths_give_the_same_estimate(mode, monkeypatch):
    """Tiny CHUNK_ELEMS forces batch chunks, channel blocks and tap blocks: same seed, same dW."""
    from fxsketch.ops import probed as pc

    x, w = torch.randn(5, 4, 9, 7, dtype=torch.float64), torch.randn(6, 2, 3, 3, dtype=torch.float64)
    geo = conv_geometry(w.shape, 2, "valid", (1, 2), 2)
    dy = torch.randn_like(F.conv2d(x, w, None, 2, "valid", (1, 2), 2))

    def estimate():
        xbar = sketch(x, 99, 6, mode, "orthogonal")
        if mode == "spatial":
            return xbar, dw_spatial(dy, xbar, 99, 6, "orthogonal", x.shape[2:], w.shape, geo)
        return xbar, dw_channel(dy, xbar, 99, 6, "orthogonal", x.shape, w.shape, geo)

    whole = estimate()
    monkeypatch.setattr(pc, "CHUNK_ELEMS", 40)
    chunked = estimate()
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape, weight", [((16, 64, 32, 32), (64, 64, 3, 3)), ((32, 256, 14, 14), (256, 256, 3, 3)),
                                           ((4, 32, 8, 28, 28), (32, 32, 3, 3, 3))])
def test_transient_memory_is_a_fraction_of_the_tensors(shape, weight):
    """Temporaries of the sketch (forward) and of the dW estimate (backward), seen by the exact
    live-storage tracker, stay a fraction of X and dY (chunked to ~1/8 of them, but never less
    than one sample: with a batch of N the dY chunk alone is at least 1/N of dY)."""
    from fxsketch.measurement import LiveStorageTracker
    x, w = torch.randn(shape), torch.randn(weight, requires_grad=True)
    rank = rank_for_ratio(shape, 1 / 16, "spatial")
    with LiveStorageTracker([x, w], record=True) as tr:
        y = probed_conv(x, w, padding=1, rank=rank)
        n_fwd, fwd_peak = len(tr.timeline), tr.peak_bytes
        dy = torch.ones_like(y)
        before = tr.live_bytes
        torch.autograd.grad(y, w, dy)
    x_bytes, y_bytes, w_bytes = x.numel() * 4, y.numel() * 4, w.numel() * 4
    sketch_bytes = shape[0] * shape[1] * rank * 4
    fwd_transient = fwd_peak - (x_bytes + w_bytes + y_bytes + sketch_bytes)
    bwd_transient = max(b for _, b in tr.timeline[n_fwd:]) - before - w_bytes
    assert fwd_transient <= 0.25 * x_bytes, fwd_transient / x_bytes
    assert bwd_transient <= 0.75 * max(x_bytes, y_bytes), bwd_transient / max(x_bytes, y_bytes)


# --------------------------------------------------------------------------------------------
# the custom ops: torch's own checks, and planning on fake tensors


@pytest.mark.parametrize("mode", ["spatial", "channel"])
def test_custom_ops_pass_opcheck(mode):
    """Schema (no aliasing, no undeclared mutation), fake vs real outputs, autograd registration
    and AOT dispatch with dynamic shapes, for fxsketch::probe_sketch and probe_weight_grad."""
    seed, ops = torch.tensor(1234), torch.ops.fxsketch
    x, dy = torch.randn(2, 3, 6, 5, dtype=torch.float64), torch.randn(2, 4, 3, 5, dtype=torch.float64)
    geo = conv_geometry((4, 3, 3, 3), (2, 1), 1, 1, 1)
    torch.library.opcheck(ops.probe_sketch.default, (x, seed, 4, mode, "orthogonal"))
    xbar = ops.probe_sketch(x, seed, 4, mode, "orthogonal")
    torch.library.opcheck(ops.probe_weight_grad.default,
                          (dy, xbar, seed, 4, mode, "orthogonal", x.shape, (4, 3, 3, 3), geo.stride,
                           geo.dilation, geo.pad_left, geo.pad_right, geo.groups, torch.float32))


@pytest.mark.parametrize("mode", ["spatial", "channel"])
def test_ops_run_on_fake_tensors_with_the_right_shapes(mode):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(4, 6, 12, 12)
        w = torch.randn(8, 6, 3, 3, requires_grad=True)
        y = lean_relu(probed_conv(x, w, None, 2, 1, rank=9, mode=mode))
        (dw,) = torch.autograd.grad(y.sum(), w)
        xbar = torch.ops.fxsketch.probe_sketch(x, torch.tensor(0), 9, mode, "gaussian")
    assert tuple(y.shape) == (4, 8, 6, 6) and dw.shape == w.shape and dw.dtype == w.dtype
    assert tuple(xbar.shape) == sketch_shape(x.shape, 9, mode) and xbar.dtype == x.dtype


# --------------------------------------------------------------------------------------------
# a user's model that calls the ops itself: traced as single nodes, planned to the measured peak


class _UsesOps(torch.nn.Module):
    def __init__(self, c, rank, mode):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(c, c, 3, 3) * 0.1)
        self.rank, self.mode = rank, mode

    def forward(self, x):
        return lean_relu(probed_conv(x, self.w, None, 1, 1, 1, 1, rank=self.rank, mode=self.mode))


@pytest.mark.parametrize("shape, rank, mode", [((16, 16, 32, 32), 64, "spatial"),
                                               ((16, 16, 32, 32), 16, "spatial"),
                                               ((16, 16, 32, 32), 8, "channel")])
def test_model_calling_the_ops_plans_to_its_measured_peak(shape, rank, mode):
    import fxsketch

    model = _UsesOps(shape[1], rank, mode)
    x = torch.randn(shape)
    gm = fxsketch.passes.trace.trace(model, (x,))
    assert {n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"} >= {"probed_conv", "lean_relu"}
    predicted = fxsketch.plan(model, (x,)).peak_bytes
    measured = fxsketch.measure(model, (x,), repeat=1).peak_bytes
    # the op's workspace is modelled from its chunking (workspace_nbytes): never far below
    assert 0.98 * measured <= predicted <= 1.10 * measured, (predicted, measured)


def test_double_backward_through_probed_conv_names_the_op_and_the_fix():
    import fxsketch
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    out = probed_conv(x, w, padding=1, rank=4).pow(2).sum()
    with pytest.raises(fxsketch.UnsupportedError, match=r"probed_conv does not support double backward.*methods="):
        torch.autograd.grad(out, x, create_graph=True)
    (gx,) = torch.autograd.grad(probed_conv(x, w, padding=1, rank=4).sum(), x)  # plain backward works
    assert gx.shape == x.shape
