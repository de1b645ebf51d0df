"""calibrate_convs: SGD noise against per-sample gradients computed independently (and its 1/B
law), closed-form probe noise against a Monte-Carlo run of the probed conv autograd op, streaming
memory, shared weights, the cache, and no mutation of the model."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxsketch import calibrate as C
from fxsketch.calibrate import calibrate_convs
from fxsketch.measurement import LiveStorageTracker
from fxsketch.ops import probed_conv


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Net(nn.Module):
    """conv-(bn)-relu x2 + pool + linear; the second conv's output goes through an in-place ReLU."""

    def __init__(self, bn=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x), inplace=True)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, 5, (n,), generator=g)


def _model(bn=True):
    torch.manual_seed(0)
    return Net(bn)


def _capture(model, x, y, conv):
    """X and dY of ``conv`` from a plain forward/backward with module and tensor hooks."""
    got = {}

    def fwd(mod, inp, out):
        got["x"] = inp[0].detach().clone()
        out.register_hook(lambda g: got.__setitem__("dy", g.detach().clone()))

    h = conv.register_forward_hook(fwd)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    torch.autograd.grad(loss, [conv.weight])
    h.remove()
    return got["x"], got["dy"]


def test_probe_noise_matches_monte_carlo_of_the_autograd_op():
    model = _model()
    x, y = _data()
    noise = calibrate_convs(model, (x,), {"conv1": model.conv1},
                            loss_fn=lambda out: F.cross_entropy(out, y, reduction="sum"))["conv1"]
    X, dY = _capture(model, x, y, model.conv1)
    c = model.conv1
    w = c.weight.detach().clone().requires_grad_()
    exact, = torch.autograd.grad(F.conv2d(X, w, None, c.stride, c.padding), w, dY)
    for r in (4, 36):
        g = torch.Generator().manual_seed(100 + r)
        sq = []
        for _ in range(128):  # Monte Carlo over the op's own seed draws
            out = probed_conv(X, w, None, c.stride, c.padding, rank=r, generator=g)
            est, = torch.autograd.grad(out, w, dY)
            sq.append(float((est - exact).pow(2).sum()))
        mc = math.sqrt(sum(sq) / len(sq))
        assert noise.probe_noise(r) == pytest.approx(mc, rel=0.2), (r, noise.probe_noise(r), mc)


def _per_sample(model, x, y, names):
    params = dict(model.named_parameters())

    def loss_one(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    g = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return {n: g[n].detach() for n in names}


def test_sgd_noise_matches_per_sample_gradients_and_follows_the_1_over_b_law():
    """No BN: g_i is the gradient of sample i's own loss (torch.func). At batch b the SGD noise of
    the summed gradient is sqrt(b) * std_i; stated for batch B it is sqrt(B) * std_i."""
    model = _model(bn=False)
    x, y = _data(n=8)
    loss = lambda out: F.cross_entropy(out, y, reduction="sum")  # noqa: E731
    at_b = calibrate_convs(model, (x,), {"c1": model.conv1, "c2": model.conv2.weight}, loss_fn=loss)
    at_64 = calibrate_convs(model, (x,), {"c1": model.conv1, "c2": model.conv2.weight}, loss_fn=loss, batch=64)
    g = _per_sample(model, x, y, ["conv1.weight", "conv2.weight"])
    for key, pname in (("c1", "conv1.weight"), ("c2", "conv2.weight")):
        sigma = float(g[pname].std(dim=0).norm())  # per-sample std, summed over dW's elements
        assert at_b[key].sgd_noise == pytest.approx(math.sqrt(8) * sigma, rel=1e-3)
        assert at_64[key].sgd_noise == pytest.approx(math.sqrt(64) * sigma, rel=1e-3)
        assert at_b[key].grad_norm == pytest.approx(float(g[pname].sum(0).norm()), rel=1e-4)
        assert (at_b[key].calibration_batch, at_64[key].batch) == (8, 64)
    # probe noise at B: the same-sample part grows with B, the cross-sample part with the pairs
    for key in ("c1", "c2"):
        diag, off = C.variance_parts(at_b[key].terms, 4)
        assert at_b[key].probe_noise(4) ** 2 == pytest.approx(diag + max(off, 0), rel=1e-9)
        assert at_64[key].probe_noise(4) ** 2 == pytest.approx(8 * diag + 72 * max(off, 0), rel=1e-9)


def test_a_conv_called_twice_sums_its_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x))).mean((2, 3))

    torch.manual_seed(0)
    model = Twice()
    x = torch.randn(6, 3, 8, 8)
    y = torch.randint(0, 3, (6,))
    noise = calibrate_convs(model, (x,), {"conv": model.conv}, loss_fn=lambda o: F.cross_entropy(o, y))["conv"]
    g = _per_sample(model, x, y, ["conv.weight"])["conv.weight"]
    # cross_entropy is a mean: sample i's share of dW is g_i / 6
    assert noise.calls == 2
    assert noise.sgd_noise == pytest.approx(math.sqrt(6) * float((g / 6).std(0).norm()), rel=1e-3)


def test_probe_noise_falls_with_rank_and_choice_is_monotone():
    model = _model()
    x, _ = _data()
    res = calibrate_convs(model, (x,), {"conv1": model.conv1, "conv2": model.conv2})
    ranks = [1, 4, 16, 36]
    for name, noise in res.items():
        values = [noise.probe_noise(r) for r in ranks]
        assert all(a > b for a, b in zip(values, values[1:])), (name, values)
        picks = [noise.smallest_rank(t, ranks) for t in (0.01, 0.1, 0.3, 1, 3, 10, 1e9)]
        assert all(a >= b for a, b in zip(picks, picks[1:])), (name, picks)
        assert noise.smallest_rank(1e-12, ranks) == max(ranks)      # none qualifies: largest
        assert noise.smallest_rank(1e12, ranks) == min(ranks)


def test_streaming_holds_little_beyond_the_step():
    """Calibration's peak stays within the plain step's own peak plus the stated hook workspace."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(4, 3, 32, 32)
    resident = list(model.parameters()) + [x]
    with LiveStorageTracker(resident) as plain:
        out = model(x)
        torch.autograd.grad(out.sum(), [m.weight for m in model if isinstance(m, nn.Conv2d)])
        del out
    convs = {str(i): m for i, m in enumerate(model) if isinstance(m, nn.Conv2d)}
    with LiveStorageTracker(resident) as cal:
        calibrate_convs(model, (x,), convs, cache=False)
    hooks = max(C.hook_workspace_nbytes((4, m.in_channels, 32, 32), (4, m.out_channels, 32, 32),
                                        tuple(m.weight.shape)) for m in convs.values())
    assert cal.peak_bytes <= plain.peak_bytes + hooks, (cal.peak_bytes, plain.peak_bytes, hooks)


def test_cache_hits_until_the_weights_change(monkeypatch):
    model = _model()
    x, _ = _data()
    calls = []
    real = C.probe_variance_terms
    monkeypatch.setattr(C, "probe_variance_terms", lambda *a: calls.append(1) or real(*a))
    a = calibrate_convs(model, (x,), {"conv1": model.conv1})
    b = calibrate_convs(model, (x,), {"conv1": model.conv1})
    assert len(calls) == 1 and a["conv1"] is b["conv1"]
    with torch.no_grad():
        model.conv1.weight.mul_(1.5)  # an optimizer step bumps the version
    calibrate_convs(model, (x,), {"conv1": model.conv1})
    assert len(calls) == 2
    calibrate_convs(model, (x.clone(),), {"conv1": model.conv1})  # other data: measured again
    assert len(calls) == 3


def test_model_not_mutated_and_no_warning():
    model = _model()
    x, _ = _data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate_convs(model, (x,), {"conv1": model.conv1, "conv2": model.conv2}, cache=False)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training and model.bn1.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_prior_rule():
    p = C.prior_noise((8, 16, 32, 32), "spatial")
    assert p.ratio(1024) == pytest.approx(C.PRIOR_SCALE)
    assert p.ratio(64) == pytest.approx(4 * C.PRIOR_SCALE)
    assert p.smallest_rank(p.ratio(256), [16, 64, 256]) == 256 and not p.calibrated


def test_errors():
    model = _model()
    x, _ = _data()
    with pytest.raises(ValueError, match="did not take part"):
        calibrate_convs(model, (x,), {"other": nn.Conv2d(3, 3, 1)})
    with pytest.raises(TypeError, match="conv nn.Module or its weight"):
        calibrate_convs(model, (x,), {"fc": "fc"})
    with pytest.raises(ValueError, match="real tensors"):
        calibrate_convs(model, (x.to("meta"),), {"conv1": model.conv1})
    with pytest.raises(ValueError, match="at least 2 samples"):
        calibrate_convs(model, (x[:1],), {"conv1": model.conv1})
