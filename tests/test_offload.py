"""Offload (fxsketch.ops.offload, passes/options/offload.py): exact gradients, device bytes that the
live-storage tracker confirms with host bytes apart, the prefetch ahead of the use, the CUDA
stream logic (through a recording stand-in for torch.cuda, and on a GPU where there is one), and
errors that name the node."""
import copy
import doctest
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch.errors import ConfigError
from fxsketch.ops import offload as rt
from fxsketch.passes.candidates import build_problem
from fxsketch.passes.options import offload as kind

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = dict(time_nodes=False, calibrate=False, workspace="off", memory_format="preserve")  # bitwise-exact against eager


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 4, 3, padding=1), nn.Sigmoid())


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
NAMED = ("_1", "_2", "_3", "_4", "_5", "_7")  # bn, relu, conv, tanh, conv, max-pool (its indices too)


def grads_of(model, x):
    out = model(x)
    out.sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_outputs_and_gradients_equal_eager_exactly():
    model = net()
    eager = copy.deepcopy(model)
    gm = fxsketch.optimize(model, (X,), methods=("offload",), offload_nodes=NAMED, **QUIET)
    assert {d.node for d in gm.memory_plan.decisions} == set(NAMED)
    want, want_grads = grads_of(eager, X)
    got, got_grads = grads_of(gm, X)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    assert all(torch.equal(a, b) for a, b in zip(gm.buffers(), eager.buffers()))  # BN statistics once
    assert rt.HOST.live_bytes == 0  # every host copy freed with the graph


def test_predicted_device_peak_matches_tracker_and_host_counted_apart():
    model = net()
    base_plan = fxsketch.plan(model, (X,))
    base = fxsketch.measure(model, (X,), repeat=1)
    gm = fxsketch.optimize(model, (X,), methods=("offload",), offload_nodes=NAMED, **QUIET)
    p, m = gm.memory_plan, fxsketch.measure(gm, (X,), repeat=1)
    assert p.peak_bytes < p.baseline_peak_bytes
    # the tracker's count differs from the prediction exactly as it does for the unmodified step
    assert m.peak_bytes - p.tensor_peak_bytes == base.peak_bytes - base_plan.tensor_peak_bytes
    assert p.host_peak_bytes > 0 and m.host_peak_bytes == p.host_peak_bytes
    assert base.host_peak_bytes == 0 and base_plan.host_peak_bytes == 0
    assert "host (offloaded)" in p.summary() and p.to_dict()["host_peak_bytes"] == p.host_peak_bytes


def test_solver_choice_is_predicted_as_verified():
    """The solver's own figure for its plan (the Choice's drops, adds) is the rewritten graph's."""
    model = net()
    gm = fxsketch.optimize(model, (X,), 0.9, methods=("offload",), max_overhead=10.0, **QUIET)
    p = gm.memory_plan
    assert p.decisions and all(d.option == "offload" for d in p.decisions)
    assert p.peak_bytes <= 0.9 * p.baseline_peak_bytes
    assert abs(fxsketch.measure(gm, (X,), repeat=1).peak_bytes - p.tensor_peak_bytes) <= 16


def _node_now() -> str:
    node = torch._C._current_autograd_node()
    return node.name() if node is not None else "-"


def test_prefetch_comes_before_the_backward_use(monkeypatch):
    """Each copy comes back in the backward of an earlier node than the one that reads it."""
    log = []
    fetch, take = rt._Entry.fetch, rt._Entry.take

    def logged_fetch(self):
        log.append(("fetch", id(self), _node_now(), self.fetched is None))
        return fetch(self)

    def logged_take(self, *a):
        log.append(("take", id(self), _node_now(), self.fetched is None))
        return take(self, *a)
    monkeypatch.setattr(rt._Entry, "fetch", logged_fetch)
    monkeypatch.setattr(rt._Entry, "take", logged_take)
    gm = fxsketch.optimize(net(), (X,), methods=("offload",), offload_nodes=NAMED, **QUIET)
    log.clear()
    grads_of(gm, X)
    takes = [e for e in log if e[0] == "take"]
    assert len({e[1] for e in takes}) >= len(NAMED)
    assert not any(empty for *_, empty in takes)  # every use found its copy back already
    fetched = {entry: (i, node) for i, (what, entry, node, empty) in enumerate(log) if what == "fetch" and empty}
    for i, (_, entry, node, _) in enumerate(log):
        if log[i][0] == "take":
            assert fetched[entry][0] < i and fetched[entry][1] not in (node, "-")


def test_offered_on_cpu_only_when_named():
    model = net()
    plain = fxsketch.Config(**QUIET)
    named = fxsketch.Config(methods=("probe", "lean", "recompute", "offload"), **QUIET)
    assert "offload" in plain.methods and plain.option_settings().offload == "auto"
    assert named.option_settings().offload == "on"
    assert fxsketch.Config(methods=("offload",), offload="off").option_settings().offload == "off"
    analysis = fxsketch.pipeline.analyse(model, (X,))

    def kinds(cfg):
        cands = build_problem(analysis.gm, analysis.schedule, analysis.timeline, methods=cfg.methods,
                              settings=cfg.option_settings())
        return {c.kind for c in cands.candidates}
    assert "offload" not in kinds(plain) and "offload" in kinds(named)


def test_cpu_price_is_the_whole_copy_time():
    """On a CPU step the copies run on the caller's thread: nothing hides them."""
    analysis = fxsketch.pipeline.analyse(net(), (X,))
    cfg = fxsketch.Config(methods=("offload",), **QUIET)
    cands = build_problem(analysis.gm, analysis.schedule, analysis.timeline, methods=cfg.methods,
                          settings=cfg.option_settings())
    for ch, cand in zip(cands.problem.choices, cands.candidates):
        n = cand.params["host_bytes"]
        count = len(ch.drops)
        want = 2 * kind.copy_seconds(2 * n, cands.cost.device.bandwidth, count)
        assert ch.cost == pytest.approx(cands.cost.fraction(want))
        assert cand.params["distance"] >= 1 and not ch.holds
    assert kind.exposed_seconds(2.0, [0.5, 0.5]) == 1.0 and kind.exposed_seconds(1.0, [3.0]) == 0.0
    assert doctest.testmod(kind).failed == 0 and doctest.testmod(rt).failed == 0


class _Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event.name))


class _Api:
    """The few torch.cuda calls CudaStreams makes, recorded, on CPU tensors."""

    def __init__(self):
        self.log, self.events = [], 0
        self.compute = _Stream("compute", self.log)

    def Stream(self, device):
        return _Stream("side", self.log)

    def current_stream(self, device):
        return self.compute

    @contextmanager
    def stream(self, s):
        self.log.append(("enter", s.name))
        yield
        self.log.append(("exit", s.name))

    def Event(self):
        api = self
        api.events += 1

        class _Event:
            name = f"e{api.events}"

            def record(self, s):
                api.log.append(("record", self.name, s.name))
        return _Event()


class _Recording(rt.CudaStreams):
    def record_stream(self, t, stream):
        self.api.log.append(("record_stream", stream.name))


def test_cuda_stream_logic_with_a_recording_stand_in():
    api = _Api()
    copies = _Recording(torch.device("cpu"), api, pinned=False)
    x = torch.randn(64, requires_grad=True)
    handle = rt.OffloadHandle((), copies)
    with torch.autograd.graph.saved_tensors_hooks(handle.pack, handle.unpack):
        y = x.exp()
    handle.release()
    out = api.log[:]
    assert out[0] == ("wait_stream", "side", "compute")  # the copy-out waits for the forward op
    assert out[1:3] == [("enter", "side"), ("exit", "side")]
    assert ("record_stream", "side") in out and out[-1][0] == "record"
    api.log.clear()
    handle.prefetch()
    assert api.log == [("enter", "side"), ("exit", "side"), ("record", "e2", "side")]
    api.log.clear()
    y.sum().backward()
    assert api.log[:2] == [("wait_event", "compute", "e2"), ("record_stream", "compute")]
    assert torch.equal(x.grad, x.detach().exp())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_exact_and_lower_allocator_peak():
    model = net().cuda()
    x = X.cuda()
    eager = copy.deepcopy(model)
    gm = fxsketch.optimize(model, (x,), methods=("offload",), offload_nodes=NAMED, **QUIET)
    want, want_grads = grads_of(eager, x)
    got, got_grads = grads_of(gm, x)
    torch.cuda.synchronize()
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    m, base = fxsketch.measure(gm, (x,), repeat=1), fxsketch.measure(eager, (x,), repeat=1)
    assert m.peak_bytes < base.peak_bytes and m.host_peak_bytes == gm.memory_plan.host_peak_bytes


def test_compiles():
    model = net()
    eager = copy.deepcopy(model)
    gm = fxsketch.optimize(model, (X,), methods=("offload",), offload_nodes=("_1", "_5"), **QUIET)
    want, want_grads = grads_of(eager, X)
    got, got_grads = grads_of(torch.compile(gm), X)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


class _Adds(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        return F.relu(h + h)


def test_bad_nodes_are_refused_by_name():
    x = torch.randn(4, 8)
    with pytest.raises(ConfigError, match="node 'add' saves no activation"):
        fxsketch.optimize(_Adds(), (x,), methods=("offload",), offload_nodes=("add",), **QUIET)
    with pytest.raises(ConfigError, match=r"\['nope'\] are not nodes"):
        fxsketch.optimize(_Adds(), (x,), methods=("offload",), offload_nodes=("nope",), **QUIET)
    with pytest.raises(ConfigError, match="needs the method"):
        fxsketch.Config(methods=("lean",), offload_nodes=("add",))
    with pytest.raises(ConfigError, match="offload must be"):
        fxsketch.Config(offload="yes")
