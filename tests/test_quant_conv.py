"""Quantized conv inputs: the output, dX and db are eager's, dW is unbiased with the stated error,
only the codes (plus a scale and zero point per sample and channel) are saved, and the backward
holds one chunk of the dequantized input."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch.calibrate import calibrate_convs
from fxsketch.errors import UnsupportedError
from fxsketch.ops import quant as q
from fxsketch.ops import qconv
from fxsketch.ops.probed import conv_geometry

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}

CASES = [((6, 8, 20), (5, 8, 5), dict(stride=2)),
         ((6, 8, 17, 15), (6, 4, 3, 3), dict(padding=1, groups=2, stride=(2, 1))),
         ((6, 4, 13, 11), (5, 4, 3, 2), dict(padding="same")),                   # asymmetric padding
         ((3, 4, 8, 9, 7), (5, 4, 3, 3, 3), dict(padding=2, dilation=2)),
         ((6, 16, 9, 9), (8, 16, 1, 1), dict())]


def _eager(x, w, b, kw, dy):
    xe = x.detach().clone().requires_grad_()
    y = _CONV[x.dim()](xe, w, b, **kw)
    return (y,) + torch.autograd.grad(y, (xe, w, b), dy)


def _quant(x, w, b, kw, dy, bits, **extra):
    xq = x.detach().clone().requires_grad_()
    y = qconv.quant_conv(xq, w, b, **kw, bits=bits, **extra)
    return (y,) + torch.autograd.grad(y, (xq, w, b), dy)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape, wshape, kw, channels_last",
                         [c + (cl,) for c in CASES for cl in (False, True) if not cl or len(c[0]) > 3])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_output_dx_db_are_eager_and_dw_is_close(monkeypatch, shape, wshape, kw, bits, channels_last, chunked):
    if chunked:
        monkeypatch.setattr(q, "BACKWARD_MIN_ELEMENTS", 0)  # chunks at these small shapes too
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=fmt)
    w, b = torch.randn(wshape, requires_grad=True), torch.randn(wshape[0], requires_grad=True)
    ye = _CONV[x.dim()](x, w, b, **kw)
    dy = torch.randn_like(ye)
    ye, ex, ew, eb = _eager(x, w, b, kw, dy)
    yq, qx, qw, qb = _quant(x, w, b, kw, dy, bits)
    assert torch.equal(yq, ye)
    if chunked:  # torch's kernel on fewer samples may pick another algorithm: rounding
        torch.testing.assert_close(qx, ex, rtol=1e-5, atol=1e-5 * ex.abs().max().item())
    else:
        assert torch.equal(qx, ex)
    assert qx.stride() == ex.stride()                                     # X's layout, as eager
    torch.testing.assert_close(qb, eb, rtol=1e-5, atol=1e-5)              # summed over chunks: rounding
    assert (qw - ew).norm() < (0.03 if bits == 8 else 0.4) * ew.norm()


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_gradient_is_unbiased_and_its_error_is_the_closed_form(bits):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 12) * torch.rand(4, 3, 1, 1) * 3 + torch.randn(4, 3, 1, 1)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    kw = dict(stride=2, padding=1)
    y = F.conv2d(x, w, **kw)
    dy = torch.randn_like(y)
    exact, = torch.autograd.grad(y, w, dy)
    stated = qconv.quant_conv_noise_sq(x, dy, w.shape, conv_geometry(w.shape, 2, 1, 1, 1), bits)
    runs = 300
    errs, total = [], torch.zeros_like(exact)
    for _ in range(runs):
        got, = torch.autograd.grad(qconv.quant_conv(x, w, **kw, bits=bits), w, dy)
        errs.append(float((got - exact).pow(2).sum()))
        total += got - exact
    assert 0.85 < (sum(errs) / runs) / stated < 1.15                     # the closed form, by Monte Carlo
    # the mean error of `runs` independent draws has energy stated / runs: within 4x of that
    assert float((total / runs).pow(2).sum()) < 4 * stated / runs


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bits,fraction", [(8, 4), (4, 8)])
def test_saves_the_codes_and_one_scale_and_zero_point_per_sample_and_channel(bits, fraction, channels_last):
    x = torch.randn(4, 8, 16, 16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    conv = nn.Conv2d(8, 6, 3, padding=1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        qconv.quant_conv(x, conv.weight, conv.bias, padding=1, bits=bits)
    rest = [t for t in saved if t is not conv.weight]
    codes, lo, step = rest
    assert codes.dtype == torch.uint8 and codes.nbytes * fraction == x.numel() * 4
    assert lo.numel() == step.numel() == 4 * 8 and lo.dtype == torch.float32
    assert qconv.conv_quant_nbytes(x.shape, bits) == codes.nbytes + lo.nbytes + step.nbytes


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_each_direction_holds_at_most_its_stated_workspace(monkeypatch, bits, channels_last):
    """The forward holds the packing's buffers beside Y and the codes (no copy of X, channels_last
    too); the backward one chunk of the dequantized X (and its dX, and a dW) beside dY, dX, dW."""
    from fxsketch.measurement import LiveStorageTracker
    monkeypatch.setattr(q, "BLOCK", 1 << 12)
    monkeypatch.setattr(q, "BACKWARD_MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    x = torch.randn(8, 8, 12, 14)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = torch.randn(6, 8, 3, 3, requires_grad=True), torch.randn(6, requires_grad=True)
    kept = []
    with LiveStorageTracker([x, w, b]) as tr, \
            torch.autograd.graph.saved_tensors_hooks(lambda s: kept.append(s) or s, lambda s: s):
        y = qconv.quant_conv(x, w, b, padding=1, bits=bits)
    codes = qconv.conv_quant_nbytes(x.shape, bits)
    held = tr.peak_bytes - tr.resident_bytes - y.nbytes - codes
    assert held <= qconv.forward_workspace_nbytes(x.shape, x.stride(), bits) + 256, held
    dy = torch.randn_like(y)
    with LiveStorageTracker([x, w, b, dy] + kept) as tr:
        grads = torch.autograd.grad(y, (x, w, b), dy)
    held = tr.peak_bytes - tr.resident_bytes - sum(g.nbytes for g in grads)
    assert q.backward_chunks("conv", x.shape, bits) is not None
    assert held <= qconv.backward_workspace_nbytes(x.shape, w.shape, bits) + 256, held
    assert held < x.nbytes // 2


def test_frozen_weight_saves_nothing_of_x_and_double_backward_is_refused():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qconv.quant_conv(x, w, padding=1)
    assert all(t is w for t in saved)
    dy = torch.randn_like(y)
    xe = x.detach().clone().requires_grad_()
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0],
                               torch.autograd.grad(F.conv2d(xe, w, padding=1), xe, dy)[0])
    w.requires_grad_()
    y = qconv.quant_conv(x, w, padding=1)
    with pytest.raises(UnsupportedError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(ValueError, match="bits"):
        qconv.quant_conv(x, w, bits=5)
    with pytest.raises(ValueError, match="needs input"):
        qconv.quant_conv(torch.randn(2, 3, 4, 4, 4), w)


def test_calibration_states_the_quantized_input_error_against_sgd_noise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 10 * 10, 3))
    x = torch.randn(6, 3, 10, 10)
    noise = calibrate_convs(model, (x,), {"a": model[0], "b": model[2]}, batch=24, cache=False)
    for n in noise.values():
        assert set(n.quant_sq) == {8, 4} and 0 < n.quant_ratio(8) < n.quant_ratio(4)
        assert 10 < n.quant_ratio(4) / n.quant_ratio(8) < 25              # 17x finer steps
    # the stated figure is the closed form on the calibration batch, scaled to the batch like SGD noise
    y_in = model[1](model[0](x)).detach()
    conv_out = model[2](y_in)
    dyb, = torch.autograd.grad(fxsketch.measurement.default_loss(model[5](model[4](model[3](conv_out)))), conv_out)
    want = qconv.quant_conv_noise_sq(y_in, dyb, model[2].weight.shape, conv_geometry(model[2].weight.shape, 1, 1, 1, 1), 8)
    assert noise["b"].quant_sq[8] == pytest.approx(want, rel=1e-4)
    assert math.isclose(noise["b"].quant_ratio(8), math.sqrt(24 / 6 * want) / noise["b"].sgd_noise, rel_tol=1e-4)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 4))


def test_planned_peak_matches_the_measured_one_and_exact_parts_stay_exact():
    model, x = _cnn(), torch.randn(16, 3, 16, 16)
    gm = fxsketch.optimize(model, (x,), methods=("quant", "lean"), max_overhead=10.0, workspace="off", seed=0,
                           memory_format="preserve")
    plan = gm.memory_plan
    convs = [d for d in plan.decisions if d.option.value == "quant" and "conv input" in d.detail]
    assert convs, [(d.node, d.detail) for d in plan.decisions]
    assert all("prior" not in d.detail for d in convs)                   # calibrated on the real batch
    measured = fxsketch.measure(gm, (x,), repeat=1).peak_bytes
    assert abs(plan.peak_bytes / measured - 1) < 0.02, (plan.peak_bytes, measured)
    assert plan.peak_bytes < plan.baseline_peak_bytes
    assert torch.equal(gm(x), model(x))
    # exact parts: the input gradient and every bias and linear gradient
    xe, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    ge = torch.autograd.grad(model(xe).sum(), [xe] + [model[i].bias for i in (0, 2, 4)] + [model[7].weight])
    gg = torch.autograd.grad(gm(xg).sum(), [xg] + [gm.get_parameter(f"{i}.bias") for i in (0, 2, 4)]
                             + [gm.get_parameter("7.weight")])
    for a, b in zip(gg, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_quant_inputs_norms_offers_no_conv_choice_and_bad_values_are_named():
    from fxsketch.pipeline import analyse, propose
    model, x = _cnn(), torch.randn(8, 3, 16, 16)
    kinds = {}
    for value in ("all", "norms"):
        proposal = propose(model, analyse(model, (x,)), fxsketch.Config(methods=("quant",), workspace="off",
                                                                         quant_inputs=value))
        kinds[value] = [c.params["kind"] for c in proposal.every.candidates if c.kind == "quant"]
    assert kinds["all"] and set(kinds["all"]) == {"conv"} and kinds["norms"] == []
    with pytest.raises(fxsketch.ConfigError, match="quant_inputs"):
        fxsketch.Config(quant_inputs="convs")


T_CASES = [((4, 8, 6, 6, 6), (8, 4, 2, 2, 2), dict(stride=2)),                    # a UNet's up-sampling
           ((4, 6, 7, 5), (6, 2, 3, 3), dict(stride=2, padding=1, output_padding=1, groups=2)),
           ((3, 4, 9), (4, 6, 3), dict(padding=1, dilation=2))]
_CONV_T = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape, wshape, kw", T_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_transposed_conv_output_dx_db_are_eager_and_dw_is_unbiased(monkeypatch, shape, wshape, kw, bits, channels_last):
    monkeypatch.setattr(q, "BACKWARD_MIN_ELEMENTS", 0)  # dW in batch chunks at these small shapes too
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 0.5
    if channels_last and len(shape) > 3:
        x = x.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)])
    w = torch.randn(wshape, requires_grad=True)
    b = torch.randn(wshape[1] * kw.get("groups", 1), requires_grad=True)
    xe = x.clone().requires_grad_()
    ye = _CONV_T[x.dim()](xe, w, b, **kw)
    dy = torch.randn_like(ye)
    ex, ew, eb = torch.autograd.grad(ye, (xe, w, b), dy)
    runs, total = 32, torch.zeros_like(ew)
    for k in range(runs):
        xq = x.clone().requires_grad_()
        yq = qconv.quant_conv_transpose(xq, w, b, **kw, bits=bits)
        assert torch.equal(yq, ye)
        qx, qw, qb = torch.autograd.grad(yq, (xq, w, b), dy)
        torch.testing.assert_close(qx, ex, rtol=1e-5, atol=1e-5 * ex.abs().max().item())  # a conv of dY
        assert qx.stride() == ex.stride()                                                  # X's layout
        torch.testing.assert_close(qb, eb, rtol=1e-5, atol=1e-5)
        if k == 0:
            one = (qw - ew).norm()
            assert one < (0.03 if bits == 8 else 0.4) * ew.norm()
        total += qw
    assert (total / runs - ew).norm() < 0.4 * one  # unbiased: the mean's error falls as 1/sqrt(32) = 0.18


@pytest.mark.parametrize("bits,fraction", [(8, 4), (4, 8)])
def test_transposed_conv_saves_the_codes_and_the_scales(bits, fraction):
    x = torch.randn(2, 8, 8, 8, 8, requires_grad=True)
    up = nn.ConvTranspose3d(8, 4, 2, stride=2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        qconv.quant_conv_transpose(x, up.weight, up.bias, stride=2, bits=bits)
    codes, lo, step = [t for t in saved if t is not up.weight]
    assert codes.dtype == torch.uint8 and codes.nbytes * fraction == x.numel() * 4
    assert qconv.conv_quant_nbytes(x.shape, bits) == codes.nbytes + lo.nbytes + step.nbytes
    frozen = up.weight.detach()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qconv.quant_conv_transpose(x, frozen, None, stride=2, bits=bits)
    assert len(saved) == 1  # no dW wanted: only the weight, for dX
    dx, = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(dx, torch.autograd.grad(F.conv_transpose3d(x, frozen, stride=2), x,
                                                       torch.ones_like(y))[0])


class _Up(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv3d(1, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose3d(8, 4, 2, stride=2)
        self.out = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.out(self.up(torch.relu(self.down(x))))


def test_transposed_conv_choice_predicts_the_rewritten_graph_and_stays_exact():
    from fxsketch.measurement import default_loss
    from fxsketch.passes.candidates import build_problem
    from fxsketch.passes.liveness import simulate
    from fxsketch.passes.rewrite import rewrite
    from fxsketch.passes.solve import evaluate
    from fxsketch.pipeline import analyse, verify
    torch.manual_seed(0)
    model, x = _Up(), torch.randn(2, 1, 32, 32, 32)
    a = analyse(model, (x,))
    built = build_problem(a.gm, a.schedule, simulate(a.schedule), methods=("quant", "lean"))
    cands = built.candidates
    ups = [i for i, c in enumerate(cands) if c.nodes == ("up",)]
    assert {cands[i].params["kind"] for i in ups} == {"conv_t"} and len(ups) == 2
    assert all("prior" in cands[i].detail for i in ups)  # calibration sees plain convs only
    lean = next(i for i, c in enumerate(cands) if c.kind == "lean")
    for i in ups:
        new = rewrite(model, a.gm, [cands[lean], cands[i]])
        assert any(n.target is qconv.quant_conv_transpose for n in new.graph.nodes)
        real = verify(new, (x,), default_loss)[1].peak_bytes
        assert abs(max(evaluate(built.problem, [lean, i])) / real - 1) < 0.02
        assert torch.equal(new(x), model(x))
        xe, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
        ge = torch.autograd.grad(model(xe).sum(), [xe, model.up.bias, model.out.weight])
        gg = torch.autograd.grad(new(xg).sum(), [xg, new.get_parameter("up.bias"), new.get_parameter("out.weight")])
        for p, r in zip(gg, ge):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
