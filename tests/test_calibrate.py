"""calibrate_convs: probe noise against a Monte-Carlo run of the probed conv autograd op, SGD
noise against per-sample / per-group gradients computed independently, monotone rank choice,
and no mutation of the model."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxsketch.calibrate import ConvNoise, calibrate_convs
from fxsketch.ops import probed_conv


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    loss = F.cross_entropy(model(x), y)
    torch.autograd.grad(loss, [conv.weight])
    h.remove()
    return got["x"], got["dy"]


def test_probe_noise_matches_monte_carlo_of_the_autograd_op():
    model = _model()
    x, y = _data()
    ranks = [2, 8, 32]
    noise = calibrate_convs(model, (x,), {"conv1": model.conv1}, {"conv1": ranks},
                            loss_fn=lambda out: F.cross_entropy(out, y), progress=False)["conv1"]
    X, dY = _capture(model, x, y, model.conv1)
    c = model.conv1
    w = c.weight.detach().clone().requires_grad_()
    exact, = torch.autograd.grad(F.conv2d(X, w, None, c.stride, c.padding), w, dY)
    for r in ranks:
        g = torch.Generator().manual_seed(100 + r)
        sq = []
        for _ in range(64):  # Monte Carlo over the op's own seed draws
            out = probed_conv(X, w, None, c.stride, c.padding, rank=r, generator=g)
            est, = torch.autograd.grad(out, w, dY)
            sq.append(float((est - exact).pow(2).sum()))
        mc = math.sqrt(sum(sq) / len(sq))
        assert noise.probe_noise[r] == pytest.approx(mc, rel=0.3), (r, noise.probe_noise[r], mc)


def test_sgd_noise_matches_per_sample_gradients():
    """No BN: N * g_i is the gradient of sample i's own loss, computed here with torch.func."""
    model = _model(bn=False)
    x, y = _data(n=8)
    noise = calibrate_convs(model, (x,), {"c1": model.conv1, "c2": model.conv2.weight},
                            {"c1": [4], "c2": [4]}, loss_fn=lambda out: F.cross_entropy(out, y),
                            progress=False)
    params = dict(model.named_parameters())

    def loss_one(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return F.cross_entropy(out, yi[None])

    per_sample = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    for key, pname in (("c1", "conv1.weight"), ("c2", "conv2.weight")):
        g = per_sample[pname].detach()                                 # (N, *W): gradient of l_i
        direct = float(g.std(dim=0).norm()) / math.sqrt(len(x))  # ||std_i||_F / sqrt(N)
        assert noise[key].sgd_noise == pytest.approx(direct, rel=1e-3)
        assert noise[key].grad_norm == pytest.approx(float(g.mean(0).norm()), rel=1e-4)
        assert noise[key].groups == len(x)


def test_sgd_noise_with_groups_matches_a_loop_over_group_batches():
    model = _model(bn=False)
    x, y = _data(n=12)
    k = 4
    noise = calibrate_convs(model, (x,), {"conv2": model.conv2}, {"conv2": [4]}, sgd_groups=k,
                            loss_fn=lambda out: F.cross_entropy(out, y), progress=False)["conv2"]
    # group g = samples g*m .. (g+1)*m - 1, m = N / k (contiguous equal groups)
    means, m = [], len(x) // k
    for gi in range(k):
        idx = torch.arange(gi * m, (gi + 1) * m)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        means.append(torch.autograd.grad(loss, model.conv2.weight)[0])
    means = torch.stack(means)
    direct = float(means.std(dim=0).norm()) / math.sqrt(k)
    assert noise.sgd_noise == pytest.approx(direct, rel=1e-3)
    assert noise.groups == k


def test_probe_noise_falls_with_rank_and_choice_is_monotone():
    model = _model()
    x, y = _data()
    ranks = [1, 4, 16, 64]
    res = calibrate_convs(model, (x,), {"conv1": model.conv1, "conv2": model.conv2},
                          {"conv1": ranks, "conv2": [1, 4, 16]}, progress=False)
    for name, noise in res.items():
        values = [noise.probe_noise[r] for r in sorted(noise.probe_noise)]
        assert all(a > b for a, b in zip(values, values[1:])), (name, values)
        picks = [noise.smallest_rank(t) for t in (0.01, 0.1, 0.3, 1, 3, 10, 1e9)]
        assert all(a >= b for a, b in zip(picks, picks[1:])), (name, picks)
        assert noise.smallest_rank(1e-9) == max(noise.probe_noise)      # none qualifies: largest
        assert noise.smallest_rank(1e9) == min(noise.probe_noise)
        r = noise.smallest_rank(1.0)
        assert noise.ratio(r) <= 1.0 or r == max(noise.probe_noise)


def test_smallest_rank_and_ratio_rules():
    n = ConvNoise(sgd_noise=2.0, probe_noise={4: 8.0, 16: 4.0, 64: 2.0, 256: 1.0})
    assert n.ratio(16) == 2.0
    assert [n.smallest_rank(t) for t in (0.1, 0.5, 1.0, 2.0, 4.0)] == [256, 256, 64, 16, 4]
    with pytest.raises(KeyError, match="calibrated ranks"):
        n.ratio(8)
    assert ConvNoise(0.0, {1: 1.0}).ratio(1) == math.inf


def test_model_not_mutated_and_no_warning():
    model = _model()
    x, _ = _data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # also: dW rebuilt from captured X, dY equals autograd's
        calibrate_convs(model, (x,), {"conv1": model.conv1, "conv2": model.conv2},
                        {"conv1": [4], "conv2": [4]}, progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training and model.bn1.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert x.grad is None


def test_fx_node_names_and_functional_convs():
    """Keys are free-form (fx node names); a traced GraphModule shares the model's parameters."""
    model = _model()
    x, _ = _data()
    gm = torch.fx.symbolic_trace(model)
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
    convs = {n.name: gm.get_submodule(n.target) for n in nodes}
    a = calibrate_convs(model, (x,), convs, {k: [4] for k in convs}, progress=False)
    b = calibrate_convs(gm, (x,), convs, {k: [4] for k in convs}, progress=False)
    assert set(a) == {"conv1", "conv2"}
    for k in a:
        assert a[k].sgd_noise == pytest.approx(b[k].sgd_noise, rel=1e-5)
        assert a[k].probe_noise == pytest.approx(b[k].probe_noise, rel=1e-5)


def test_errors():
    model = _model()
    x, _ = _data()
    with pytest.raises(ValueError, match="no candidate ranks"):
        calibrate_convs(model, (x,), {"conv1": model.conv1}, {}, progress=False)
    with pytest.raises(ValueError, match="did not take part"):
        calibrate_convs(model, (x,), {"other": nn.Conv2d(3, 3, 1)}, {"other": [2]}, progress=False)
    with pytest.raises(TypeError, match="conv nn.Module or its weight"):
        calibrate_convs(model, (x,), {"fc": "fc"}, {"fc": [2]}, progress=False)
    with pytest.raises(ValueError, match="real tensors"):
        calibrate_convs(model, (x.to("meta"),), {"conv1": model.conv1}, {"conv1": [2]}, progress=False)
