"""DFA and MEM-DFA (methods=("dfa-plain",) and ("dfa",)): gradients, memory, errors.

Checks that cannot pass by accident: on a one-layer model (one block, which gets the true
error) MEM-DFA is backprop; on a 3-layer MLP both runtimes take the same steps as a DFA loop
written out here with explicit matrices; MEM-DFA's gradients are plain DFA's bit for bit
(the two differ only in memory); MEM-DFA's measured peak does not grow with depth, and the
liveness model predicts it.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch.errors import BudgetError, ConfigError, UnsupportedError
from fxsketch.ops.dfa import FEEDBACK_DIM, feedback, feedback_matrix


def mlp(depth=3, width=16, d_in=8, d_out=10, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


class ResCNN(nn.Module):
    """conv-BN-ReLU, a residual block with a 1x1 downsample added in place, dropout, linear."""

    def __init__(self, c=8):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.ds, self.drop, self.fc = nn.Conv2d(c, c, 1), nn.Dropout(0.2), nn.Linear(c, 10)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.c2(F.relu(self.bn1(self.c1(h)))))
        y += self.ds(h)                       # the skip crosses a block boundary
        return self.fc(self.drop(F.relu(y)).mean((2, 3)))


class Chunked(nn.Module):
    """A tuple (chunk) whose items are read by different later blocks."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 20), nn.Linear(10, 10), nn.Linear(10, 10)

    def forward(self, x):
        t = torch.relu(self.fc1(x)).chunk(2, 1)
        return self.fc3(self.fc2(t[0])) * t[1]


def step(module, x, y, rng_seed=5):
    """Gradients, output and buffers of one step of a deep copy of ``module``."""
    m = copy.deepcopy(module)
    torch.manual_seed(rng_seed)  # the same dropout masks for every runtime
    out = m(x)
    F.cross_entropy(out, y).backward()
    return ({k: p.grad for k, p in m.named_parameters()}, out.detach(),
            {k: b.clone() for k, b in m.named_buffers()})


def test_one_layer_mem_dfa_is_backprop():
    # one weight layer = one block, which gets the true error: DFA must be exactly backprop
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh())
    x, y = torch.randn(16, 8), torch.randint(0, 6, (16,))
    gm = fxsketch.optimize(model, (x,), methods=("dfa",))
    assert len(gm.fxsketch_dfa.blocks) == 1
    got, out, _ = step(gm, x, y)
    want, ref, _ = step(model, x, y)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for k in want:
        assert want[k].abs().sum() > 0
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["dfa", "dfa-plain"])
def test_mlp_steps_match_a_reference_dfa_loop(method):
    model = mlp(depth=3)
    gm = fxsketch.optimize(model, (torch.randn(32, 8),), methods=(method,), seed=11)
    blocks = gm.memory_plan.notes[-2]
    assert blocks.endswith("blocks: _0.._1 | _2.._3 | _4"), blocks
    B1, B2 = feedback_matrix(11, 0, 16, 10), feedback_matrix(11, 1, 16, 10)  # numbered in block order
    W = [t.detach().clone() for t in model.parameters()]  # W1 b1 W2 b2 W3 b3, the reference's copy
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()
        # the reference: DFA written out (delta_l = (B_l e) * f'(a_l), dW_l = delta_l^T h_{l-1})
        W1, b1, W2, b2, W3, b3 = W
        a1 = x @ W1.T + b1
        h1 = a1.relu()
        a2 = h1 @ W2.T + b2
        h2 = a2.relu()
        out = h2 @ W3.T + b3
        e = (out.softmax(1) - F.one_hot(y, 10)) / len(y)       # dL/d(output) of the mean CE
        d1 = (e @ B1.T) * (a1 > 0)
        d2 = (e @ B2.T) * (a2 > 0)
        grads = [d1.T @ x, d1.sum(0), d2.T @ h1, d2.sum(0), e.T @ h2, e.sum(0)]
        W = [w - 0.1 * dw for w, dw in zip(W, grads)]
    for got, want in zip(model.parameters(), W):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, shape", [(lambda: mlp(depth=5), (24, 8)), (ResCNN, (4, 3, 8, 8)),
                                         (Chunked, (6, 8))], ids=["mlp", "residual-cnn", "chunked"])
def test_mem_dfa_gradients_equal_plain_dfa_exactly(make, shape):
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    mem = fxsketch.optimize(model, (x,), methods=("dfa",), seed=3)
    plain = fxsketch.optimize(model, (x,), methods=("dfa-plain",), seed=3)
    assert sorted(mem.state_dict()) == sorted(model.state_dict())
    assert all(a is b for a, b in zip(mem.parameters(), model.parameters()))
    (ga, oa, ba), (gb, ob, bb) = step(mem, x, y), step(plain, x, y)
    _, ref, bref = step(model, x, y)
    assert torch.equal(oa, ob) and torch.equal(oa, ref)     # the forward is the model's
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
        assert ga[k].abs().sum() > 0, k
    for k in ba:  # BatchNorm statistics updated once per step, as eagerly (the replay restores them)
        assert torch.equal(ba[k], bb[k]) and torch.equal(ba[k], bref[k]), k


def test_wide_output_error_is_count_sketched_into_a_fixed_matrix():
    """An output error wider than FEEDBACK_DIM goes through B' S: feedback() equals the whole
    matrix feedback_matrix() returns (rank <= FEEDBACK_DIM, entries of variance ~ 1/width), and a
    dense-output model trains with MEM-DFA gradients equal to plain DFA's."""
    width, rows = 3 * FEEDBACK_DIM + 5, 40
    torch.manual_seed(0)
    e = torch.randn(3, width, dtype=torch.float64)
    B = feedback_matrix(5, 2, rows, width, dtype=torch.float64)
    torch.testing.assert_close(feedback(e, 5, 2, (3, rows)), e @ B.T)
    assert torch.linalg.matrix_rank(B) <= FEEDBACK_DIM
    assert 0.8 < float(B.pow(2).mean() * width) < 1.25   # the scale of the dense matrix kept
    assert torch.equal(feedback_matrix(5, 2, rows, width, dtype=torch.float64), B)  # fixed: a function of (seed, key)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 1, 3, padding=1))
    x, y = torch.randn(2, 1, 24, 24), torch.rand(2, 1, 24, 24)   # e: 576 elements per sample
    grads = []
    for method in ("dfa", "dfa-plain"):
        gm = fxsketch.optimize(model, (x,), methods=(method,), seed=1)
        model.zero_grad()
        F.mse_loss(gm(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b) and a.abs().sum() > 0


def test_mem_dfa_trains_with_autograd_grad_and_no_grad_inference():
    model = mlp(depth=4)
    x = torch.randn(8, 8)
    gm = fxsketch.optimize(model, (x,), methods=("dfa",))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    grads = torch.autograd.grad(gm(x).square().sum(), list(gm.parameters()))
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())  # autograd.grad left .grad alone
    plan = copy.deepcopy(gm).memory_plan
    assert plan.decisions[0].option == "dfa" and "MEM-DFA" in plan.decisions[0].detail


@pytest.fixture(scope="module")
def depth_runs():
    """MEM-DFA on MLPs of 4 and 32 layers whose activations dominate the step (width 16, batch
    4096): predicted and measured peaks, and backprop's measured peak."""
    x = torch.randn(4096, 16)
    runs = {}
    for depth in (4, 32):
        model = mlp(depth=depth, width=16, d_in=16)
        gm = fxsketch.optimize(model, (x,), methods=("dfa",))
        runs[depth] = dict(predicted=gm.memory_plan.peak_bytes, measured=fxsketch.measure(gm, x, repeat=1).peak_bytes,
                           backprop=fxsketch.measure(model, x, repeat=1).peak_bytes)
    return runs


def test_mem_dfa_peak_is_flat_in_depth(depth_runs):
    four, deep = depth_runs[4]["measured"], depth_runs[32]["measured"]
    assert deep <= 1.10 * four, (four, deep)
    assert depth_runs[32]["backprop"] > 3 * deep  # backprop's grows with depth (sanity of the setup)


@pytest.mark.parametrize("depth", [4, 32])
def test_liveness_model_predicts_mem_dfa_within_5_percent(depth_runs, depth):
    run = depth_runs[depth]
    assert abs(run["predicted"] / run["measured"] - 1) <= 0.05, run


@pytest.mark.parametrize("method", ["dfa", "dfa-plain"])
def test_liveness_model_predicts_residual_dfa(method):
    torch.manual_seed(0)
    model, x = ResCNN(), torch.randn(8, 3, 16, 16)
    gm = fxsketch.optimize(model, (x,), methods=(method,))
    measured = fxsketch.measure(gm, x, repeat=1).peak_bytes
    assert abs(gm.memory_plan.peak_bytes / measured - 1) <= 0.05, (gm.memory_plan.peak_bytes, measured)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x), self.b(x)


def test_output_must_be_one_tensor():
    with pytest.raises(UnsupportedError, match="return one floating-point tensor.*returns a tuple"):
        fxsketch.optimize(TwoHeads(), (torch.randn(2, 4),), methods=("dfa",))


def test_budget_it_cannot_meet_says_what_it_reaches():
    model, x = mlp(depth=4), torch.randn(64, 8)
    reached = fxsketch.optimize(model, (x,), methods=("dfa",)).memory_plan.peak_bytes
    with pytest.raises(BudgetError, match="MEM-DFA reaches a predicted peak") as err:
        fxsketch.optimize(model, (x,), budget=2048, methods=("dfa",))
    assert err.value.lowest == reached
    with pytest.raises(BudgetError, match=r"methods=\('dfa',\) \(MEM-DFA"):
        fxsketch.optimize(model, (x,), budget=2048, methods=("dfa-plain",))
    assert fxsketch.optimize(model, (x,), budget=reached, methods=("dfa",)).memory_plan.budget_bytes == reached


@pytest.mark.parametrize("methods", [("dfa", "probe"), ("lean", "dfa-plain"), ("dfa", "dfa-plain")])
def test_dfa_is_not_combined_with_other_methods(methods):
    with pytest.raises(ConfigError, match="cannot be combined"):
        fxsketch.optimize(mlp(), (torch.randn(4, 8),), methods=methods)


def test_inputs_that_require_grad_are_refused():
    model, x = mlp(), torch.randn(4, 8)
    with pytest.raises(UnsupportedError, match="no input gradient"):
        fxsketch.optimize(model, (x.requires_grad_(),), methods=("dfa",))
    gm = fxsketch.optimize(model, (x.detach(),), methods=("dfa",))
    with pytest.raises(UnsupportedError, match="requires grad"):
        gm(torch.randn(4, 8, requires_grad=True))
