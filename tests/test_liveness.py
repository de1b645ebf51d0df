"""passes/liveness.py: the sweep on literal schedules, a brute-force property test, and the
predicted peak of plan() against the exact CPU tracker of measure() on real and hand-made models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxsketch
from fxsketch.passes.liveness import CATEGORIES, Schedule, Step, simulate
from fxsketch.passes.saved import Kind, StorageInfo

P, I, A, N, G, W, PG = (Kind.PARAM, Kind.INPUT, Kind.ACTIVATION, Kind.INTERNAL, Kind.GRAD,
                        Kind.WORKSPACE, Kind.PARAM_GRAD)


def schedule(steps, sizes, pinned=()):
    """Literal schedule: ``steps`` as (phase, node, allocs, reads), ``sizes`` as {id: (nbytes, kind)}."""
    return Schedule([Step(p, n, tuple(a), tuple(r)) for p, n, a, r in steps],
                    {s: StorageInfo(s, b, k, f"s{s}") for s, (b, k) in sizes.items()}, set(pinned))


# --------------------------------------------------------------------------------------------
# literal schedules, counted by hand


# a = W·x, b = f(a); loss; backward through b (saves a) and a. Storage 3 (b) is the model output.
TWO_LAYERS = schedule(
    steps=[
        ("forward", "a", [2], [0, 1]),
        ("forward", "b", [3], [2, 0]),
        ("loss", "loss", [4], [3]),
        ("backward", "loss", [5], [4]),
        ("backward", "b", [6, 7], [2, 5]),
        ("backward", "a", [], [1, 6]),
    ],
    sizes={0: (100, P), 1: (10, I), 2: (40, A), 3: (20, A), 4: (4, A), 5: (20, G), 6: (40, G),
           7: (100, PG)},
    pinned=[3],
)


def test_two_layers_live_bytes_and_peak():
    tl = simulate(TWO_LAYERS)
    #                 a    b    loss  bw-loss  bw-b  bw-a
    assert tl.live_bytes == (150, 170, 174, 194, 330, 270)
    assert tl.peak_bytes == 330 and tl.peak_step == 4
    assert tl.peak_node == ("backward", "b")
    assert set(tl.alive_at_peak) == {0, 1, 2, 3, 5, 6, 7}
    sizes = [TWO_LAYERS.storages[s].nbytes for s in tl.alive_at_peak]
    assert sizes == sorted(sizes, reverse=True)  # largest first


def test_two_layers_intervals():
    tl = simulate(TWO_LAYERS)
    assert tl.intervals == {
        0: (0, 5), 1: (0, 5),   # parameter and input: resident
        2: (0, 4),              # a: until b's backward has read it
        3: (1, 5),              # b: the model output, pinned to the end
        4: (2, 3), 5: (3, 4), 6: (4, 5),
        7: (4, 5),              # parameter gradient: kept
    }


def test_two_layers_categories():
    tl = simulate(TWO_LAYERS)
    assert set(tl.by_category[0]) == set(CATEGORIES)
    assert tl.by_category[4] == {"parameters": 100, "inputs": 10, "gradients": 100,
                                 "saved": 40,                  # a, read by backward b
                                 "transient": 20 + 20 + 40,   # output b, grad of b, grad of a
                                 "workspace": 0}
    assert tl.by_category[2]["saved"] == 40 + 4                # the loss is read by its backward
    for cats, live in zip(tl.by_category, tl.live_bytes):
        assert sum(cats.values()) == live


def test_pinned_storage_lives_to_the_end():
    steps = [("forward", "a", [0], []), ("forward", "b", [1], [0]), ("forward", "c", [], [1])]
    free = simulate(schedule(steps, {0: (8, A), 1: (4, A)}))
    kept = simulate(schedule(steps, {0: (8, A), 1: (4, A)}, pinned=[0]))
    assert free.live_bytes == (8, 12, 4)
    assert kept.live_bytes == (8, 12, 12)
    assert kept.intervals[0] == (0, 2)


def test_read_before_allocation_existed_from_that_step():
    # a storage that only appears as a read (made outside the schedule) lives from its first read
    tl = simulate(schedule([("forward", "a", [0], []), ("forward", "b", [], [1, 0]),
                            ("forward", "c", [], [1])], {0: (8, A), 1: (16, A)}))
    assert tl.live_bytes == (8, 24, 16)


def test_resident_kinds_count_even_when_unused():
    tl = simulate(schedule([("forward", "a", [1], []), ("forward", "b", [], [1])],
                           {0: (100, P), 1: (8, A), 2: (5, Kind.BUFFER), 3: (7, I)}))
    assert tl.live_bytes == (120, 120)
    assert tl.by_category[0]["parameters"] == 105 and tl.by_category[0]["inputs"] == 7


def test_parameter_gradient_is_kept_but_activation_gradient_is_not():
    tl = simulate(schedule([("backward", "x", [0, 1], []), ("backward", "y", [], [1]),
                            ("backward", "z", [], [])], {0: (50, PG), 1: (30, G)}))
    assert tl.live_bytes == (80, 80, 50)
    assert tl.by_category[2] == {"parameters": 0, "inputs": 0, "gradients": 50, "saved": 0,
                                 "transient": 0, "workspace": 0}


def test_workspace_is_transient_within_its_step():
    tl = simulate(schedule([("forward", "a", [0, 1], []), ("forward", "b", [2], [0])],
                           {0: (10, A), 1: (1000, W), 2: (10, A)}))
    assert tl.live_bytes == (1010, 20)
    assert tl.peak_step == 0 and tl.by_category[0]["transient"] == 1010


def test_first_of_equal_peaks_is_reported():
    tl = simulate(schedule([("forward", "a", [0], []), ("forward", "b", [1], []),
                            ("forward", "c", [2], [1])], {0: (8, A), 1: (8, A), 2: (0, A)}))
    assert tl.live_bytes == (8, 8, 8) and tl.peak_step == 0


def test_empty_schedule():
    tl = simulate(Schedule([], {}))
    assert tl.live_bytes == () and tl.peak_bytes == 0


def test_copy_and_edit_leave_the_original_alone():
    s = TWO_LAYERS.copy()
    s.edit(s.index("backward", "b"), reads=(5,))  # pretend b saved nothing
    assert simulate(s).peak_bytes == 330 - 40
    assert simulate(TWO_LAYERS).peak_bytes == 330
    with pytest.raises(KeyError, match="no forward step for node 'zz'"):
        s.index("forward", "zz")


# --------------------------------------------------------------------------------------------
# property: the sweep equals a brute-force recount


KINDS = list(Kind)
PHASES = ["forward", "loss", "backward", "recompute"]


@st.composite
def random_schedules(draw):
    n_storages = draw(st.integers(1, 12))
    sizes = {s: (draw(st.integers(0, 1000)), draw(st.sampled_from(KINDS))) for s in range(n_storages)}
    ids = st.lists(st.integers(0, n_storages - 1), max_size=4, unique=True)
    steps = draw(st.lists(st.tuples(st.sampled_from(PHASES), st.just("n"), ids, ids),
                          min_size=1, max_size=15))
    steps = [(p, f"n{i}", a, r) for i, (p, _, a, r) in enumerate(steps)]
    pinned = draw(st.lists(st.integers(0, n_storages - 1), unique=True, max_size=n_storages))
    return schedule(steps, sizes, pinned)


def brute_force_live(s: Schedule) -> list[int]:
    """Live bytes per step, storage by storage, straight from the rules in liveness.py."""
    end = len(s.steps) - 1
    live = [0] * len(s.steps)
    for sid, info in s.storages.items():
        used = [i for i, st_ in enumerate(s.steps) if sid in st_.allocs or sid in st_.reads]
        if info.kind in (P, Kind.BUFFER, I):
            lo, hi = 0, end
        elif not used:
            continue
        elif sid in s.pinned or info.kind is PG:
            lo, hi = used[0], end
        else:
            lo, hi = used[0], used[-1]
        for i in range(lo, hi + 1):
            live[i] += info.nbytes
    return live


@settings(max_examples=200, deadline=None)
@given(random_schedules())
def test_sweep_matches_brute_force(s):
    tl = simulate(s)
    live = brute_force_live(s)
    assert list(tl.live_bytes) == live
    assert all(b >= 0 for b in tl.live_bytes)
    assert tl.peak_bytes == max(live)
    assert tl.peak_step == live.index(max(live))
    for cats, total in zip(tl.by_category, tl.live_bytes):
        assert all(v >= 0 for v in cats.values()) and sum(cats.values()) == total
    assert sum(s.storages[i].nbytes for i in tl.alive_at_peak) == tl.peak_bytes


# --------------------------------------------------------------------------------------------
# predicted against measured


def assert_predicts(model, inputs, *, loss_fn=None, leaf_modules=(), tol=0.05):
    """plan()'s peak is within ``tol`` of measure()'s exact CPU peak; returns both."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    predicted = fxsketch.plan(model, inputs, loss_fn=loss_fn, leaf_modules=leaf_modules).tensor_peak_bytes  # the tracker sees tensors only (kernel workspace: test_workspace.py)
    measured = fxsketch.measure(model, inputs, loss_fn=loss_fn, repeat=1).peak_bytes
    err = predicted / measured - 1
    assert abs(err) <= tol, (f"{type(model).__name__}: predicted {predicted} B, measured "
                             f"{measured} B, error {100 * err:+.2f}% (tolerance {100 * tol:.0f}%)")
    return predicted, measured


def _seeded(make):
    torch.manual_seed(0)
    return make()


def _torchvision(name):
    tv = pytest.importorskip("torchvision")
    return lambda: getattr(tv.models.video if name == "r3d_18" else tv.models, name)()


def _monai_unet():
    nets = pytest.importorskip("monai.networks.nets")
    return nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64),
                     strides=(2, 2, 2), num_res_units=2)


@pytest.mark.parametrize("name, shape", [
    ("resnet18", (2, 3, 64, 64)),
    ("vgg11", (2, 3, 32, 32)),
    ("mobilenet_v2", (2, 3, 64, 64)),
    ("r3d_18", (2, 3, 8, 32, 32)),
])
def test_torchvision_models(name, shape):
    model = _seeded(_torchvision(name))
    assert_predicts(model, torch.randn(*shape))


def test_monai_unet_3d():
    model = _seeded(_monai_unet)
    assert_predicts(model, torch.randn(2, 1, 32, 32, 32))


# hand-made graphs: activations dominate (batch 32, few parameters), so the check has teeth


class Views(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):                 # 32x64
        h = self.fc1(x).view(32, 16, 16)  # view
        h = h.transpose(1, 2)             # view, not contiguous
        h = h.narrow(2, 4, 8)             # view: 32x16x8
        h = torch.tanh(h).flatten(1)      # 32x128, flatten of a contiguous result is a view
        return self.fc2(h[:, :64])


class ConvBNReLU(nn.Module):
    def __init__(self, c_in=8, c_out=8, inplace=True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=inplace)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class InplaceReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ConvBNReLU(3, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = self.block(x)                 # nn.ReLU(inplace=True)
        h = self.conv(h)
        h = h.relu_()                     # a method call, in place
        return h.mean((2, 3))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = ConvBNReLU()
        self.b = ConvBNReLU()

    def forward(self, x):
        x = self.stem(x)
        x = x + self.a(x)
        x = torch.relu(x + self.b(x))
        return x.sum((2, 3))


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 8, 3, padding=1)
        self.right = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(15, 8, 1)

    def forward(self, x):
        return self.head(torch.cat([self.left(x), self.right(x), x], dim=1))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = ConvBNReLU(inplace=False)  # same weights, called twice

    def forward(self, x):
        return self.block(self.block(self.stem(x)))


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = ConvBNReLU(3, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class TwoHeads(nn.Module):
    """Returns a tuple; one head is a view of the trunk's output."""

    def __init__(self):
        super().__init__()
        self.trunk = ConvBNReLU(3, 8)
        self.seg = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.trunk(x)
        return self.seg(h), h.mean((2, 3)), h[:, :2]


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)

    def forward(self, x, mask):
        h = self.a(x) * torch.sigmoid(self.b(mask))
        return {"logits": h.mean((2, 3)), "map": h}


def image(c=3):
    return torch.randn(32, c, 32, 32)


def test_views():
    assert_predicts(_seeded(Views), torch.randn(32, 64))


def test_inplace_relu():
    assert_predicts(_seeded(InplaceReLU), image())


def test_residual_adds():
    assert_predicts(_seeded(Residual), image())


def test_cat():
    assert_predicts(_seeded(Cat), image())


def test_shared_submodule_called_twice():
    assert_predicts(_seeded(Shared), image())


def test_custom_loss_fn():
    # targets made inside loss_fn (see the xfail below for targets captured from outside)
    def loss_fn(out):
        return F.cross_entropy(out, torch.arange(out.shape[0]) % out.shape[1])
    assert_predicts(_seeded(Classifier), image(), loss_fn=loss_fn)


def test_custom_loss_fn_with_captured_targets():
    targets = torch.randint(0, 10, (32,))
    assert_predicts(_seeded(Classifier), image(), loss_fn=lambda out: F.cross_entropy(out, targets))


def test_input_requires_grad():
    x = image().requires_grad_(True)
    assert_predicts(_seeded(Residual), x)
    assert x.grad is None  # neither call writes into the caller's input


def test_tuple_output():
    assert_predicts(_seeded(TwoHeads), image())


def test_multiple_inputs_and_dict_output():
    assert_predicts(_seeded(TwoInputs), (image(), image(1)))


def test_frozen_layers_save_less():
    model = _seeded(Residual)
    for p in model.stem.parameters():
        p.requires_grad_(False)
    assert_predicts(model, image())


class _Recurrent(nn.Module):
    def __init__(self, cls, layers):
        super().__init__()
        self.rnn = cls(64, 64, layers, batch_first=True)
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(64, 192)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (z.view(b, t, 4, 16).transpose(1, 2) for z in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 64)


@pytest.mark.parametrize("layers", [1, 2])
def test_lstm_reserve_buffer_is_predicted(layers):
    # oneDNN's LSTM workspace is returned by the kernel and saved for backward; its fake kernel
    # returns it empty (passes/reserve.py measures it): before, -55 % and -76 % here
    assert_predicts(_seeded(lambda: _Recurrent(nn.LSTM, layers)), torch.randn(16, 32, 64))


def test_gru_and_attention_are_predicted():
    assert_predicts(_seeded(_Attention), torch.randn(4, 64, 64))
    # the CPU GRU runs step by step inside one node; its backward frees each step's saved
    # tensors as it goes, which the tracker follows (before: +16 % over)
    assert_predicts(_seeded(lambda: _Recurrent(nn.GRU, 2)), torch.randn(16, 32, 64))


class _Loop(nn.Module):
    """fx cannot trace it (a Python loop over a tensor's length): kept whole via leaf_modules."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x):
        h, outs = torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            h = torch.tanh(x[:, t] + h @ self.w)
            outs.append(h)
        return torch.stack(outs, 1)


class _Wrapped(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inp, self.inner, self.out = nn.Linear(32, 64), inner, nn.Linear(64, 4)

    def forward(self, x):
        return self.out(self.inner(self.inp(x)))


@pytest.mark.parametrize("inner,leaves", [
    (lambda: nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0), ()),  # was +54 %
    (_Loop, (_Loop,)),
])
def test_opaque_nested_modules_are_predicted_and_named(inner, leaves):
    model = _seeded(lambda: _Wrapped(inner()))
    x = torch.randn(16, 64, 32)
    assert_predicts(model, x, leaf_modules=leaves)
    note = next(n for n in fxsketch.plan(model, (x,), leaf_modules=leaves).notes if n.startswith("opaque"))
    assert f"inner ({type(model.inner).__name__})" in note
