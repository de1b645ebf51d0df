"""memory_viz export: a plan's predicted step as the snapshot torch's memory viewer reads."""
import base64
import dataclasses
import json
import pickle
import pickletools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.cuda import _memory_viz

import fxsketch
from fxsketch import ConfigError
from fxsketch.memory_viz import ALIGN
from fxsketch.passes.sweep import live_bytes
from fxsketch.report import MemoryPlan, StorageSpan, TimelineData

PHASES = {"forward", "loss", "backward", "recompute", "resident"}
# what the viewer's JavaScript unpickler (torch/utils/viz/MemoryViz.js) can read
VIEWER_OPCODES = {"PROTO", "FRAME", "STOP", "MARK", "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET",
                  "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
                  "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "BININT", "BININT1", "BININT2", "LONG1",
                  "BINFLOAT", "SHORT_BINUNICODE", "BINUNICODE", "NEWTRUE", "NEWFALSE", "NONE"}


def small_net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


@pytest.fixture(scope="module")
def optimized():
    torch.manual_seed(0)
    gm = fxsketch.optimize(small_net(), (torch.randn(8, 3, 32, 32),), workspace="off", progress=False, seed=0)
    assert gm.memory_plan.decisions  # the two steps differ
    return gm


@pytest.fixture(scope="module")
def unmodified():
    torch.manual_seed(0)
    return fxsketch.plan(small_net(), (torch.randn(2, 3, 16, 16),))


def replay(trace):
    """Live bytes at the trace's highest point and the blocks still allocated at its end; checks
    that every free matches an alloc (free_requested, then free_completed) and that no two live
    blocks overlap."""
    live, requested, now, peak = {}, set(), 0, 0
    for e in trace:
        addr, size = e["addr"], e["size"]
        if e["action"] == "alloc":
            end = addr + -(-size // ALIGN) * ALIGN
            assert all(a + -(-n // ALIGN) * ALIGN <= addr or end <= a for a, n in live.items()), e
            live[addr] = size
            now += size
            peak = max(peak, now)
        elif e["action"] == "free_requested":
            assert live.get(addr) == size and addr not in requested, e
            requested.add(addr)
        else:
            assert e["action"] == "free_completed" and addr in requested, e
            requested.remove(addr)
            now -= live.pop(addr)
    assert not requested
    return peak, live


def check_segment(snap, device, left):
    """The device's segment holds exactly the blocks left allocated, tiled without gaps."""
    seg = next(s for s in snap["segments"] if s["device"] == device)
    blocks = seg["blocks"]
    assert sum(b["size"] for b in blocks) == seg["total_size"]
    assert [b["address"] for b in blocks] == [seg["address"] + sum(b["size"] for b in blocks[:i])
                                              for i in range(len(blocks))]
    active = {b["address"]: b["requested_size"] for b in blocks if b["state"] == "active_allocated"}
    assert active == left


def test_save_pickle_writes_both_steps_with_the_predicted_peaks(optimized, tmp_path):
    plan = optimized.memory_plan
    path = plan.save(tmp_path / "plan.pickle")
    with open(path, "rb") as f:
        snap = pickle.load(f)
    assert set(snap) >= {"segments", "device_traces"} and len(snap["device_traces"]) == 2
    assert plan.peak_bytes == plan.tensor_peak_bytes  # workspace="off": no kernel workspace in either
    for device, tl in enumerate((plan.baseline, plan.timeline)):
        peak, left = replay(snap["device_traces"][device])
        assert peak == tl.peak_bytes
        assert len(left) == sum(1 for s in tl.storages if s.kept and s.nbytes)
        check_segment(snap, device, left)
    assert replay(snap["device_traces"][1])[0] == plan.peak_bytes < plan.baseline_peak_bytes
    assert _memory_viz.segsum(snap)  # torch's own accounting of the segments adds up
    assert _memory_viz.trace(snap).count("Device ") == 2


def test_frames_name_the_node_phase_and_owner(optimized):
    plan = optimized.memory_plan
    snap = plan.to_memory_viz()
    nodes = {n.name for n in optimized.graph.nodes}
    allocs = [e for e in snap["device_traces"][1] if e["action"] == "alloc"]
    made, owner, freed, step = zip(*(e["frames"] for e in allocs))
    assert {f["filename"] for f in made} <= PHASES
    assert {f["fx_node_name"] for f in made if "fx_node_name" in f} <= nodes
    assert {d.rewritten for d in plan.decisions} <= {f["name"] for f in made}  # the rewritten nodes allocate
    assert all(f["filename"] == "owner" for f in owner) and {f["filename"] for f in freed} <= {"freed after", "kept"}
    assert {f["filename"] for f in step} == {f"optimized step of Sequential ({len(plan.decisions)} decisions)"}
    assert any("(activation, saved)" in f["name"] for f in owner)


def test_which_selects_the_step(optimized, tmp_path):
    plan = optimized.memory_plan
    for which, tl in (("optimized", plan.timeline), ("unmodified", plan.baseline)):
        snap = plan.to_memory_viz(tmp_path / f"{which}.pickle", which=which)
        assert len(snap["device_traces"]) == 1 and replay(snap["device_traces"][0])[0] == tl.peak_bytes
        with open(tmp_path / f"{which}.pickle", "rb") as f:
            assert pickle.load(f) == snap
    with pytest.raises(ConfigError, match="which must be one of"):
        plan.to_memory_viz(which="after")


def test_torchs_viewer_pages_carry_the_snapshot(optimized):
    snap = optimized.memory_plan.to_memory_viz()
    data = pickle.dumps(snap, protocol=4)
    assert {op.name for op, _, _ in pickletools.genops(data)} <= VIEWER_OPCODES
    for page in (_memory_viz.trace_plot(snap), _memory_viz.segment_plot(snap)):
        assert "MemoryViz.js" in page
        # the page embeds the snapshot as a base64 pickle: node names are in it, not in the HTML text
        encoded = json.loads(re.search(r"const local_files = (\[.*\])", page).group(1))[0]["base64"]
        payload = base64.b64decode(encoded)
        assert pickle.loads(payload) == snap
        assert all(d.rewritten.encode() in payload for d in optimized.memory_plan.decisions)


def test_plan_of_the_unmodified_model_includes_kernel_workspace(unmodified, tmp_path):
    snap = pickle.loads(unmodified.save(tmp_path / "p.pickle").read_bytes())
    first, second = snap["device_traces"]
    assert replay(first)[0] == replay(second)[0] == unmodified.peak_bytes >= unmodified.tensor_peak_bytes
    assert [e["size"] for e in first] == [e["size"] for e in second]
    names = {f["name"] for e in first for f in e["frames"][:1]}
    assert "_0" in names and "before the step" in names  # conv _0's output; the parameters and input


def test_json_carries_the_storages(unmodified):
    d = json.loads(unmodified.to_json())
    fields = d["timeline"]["storage_fields"]
    assert fields[:4] == ["owner", "kind", "category", "nbytes"]
    assert len(d["timeline"]["storages"]) == len(unmodified.timeline.storages)
    assert all(len(row) == len(fields) for row in d["timeline"]["storages"])


def test_a_plan_pickled_before_storages_were_recorded_loads_but_is_refused(unmodified):
    old = dataclasses.replace(unmodified, baseline=dataclasses.replace(unmodified.baseline),
                              timeline=dataclasses.replace(unmodified.timeline))
    for tl in (old.baseline, old.timeline):
        del tl.__dict__["storages"]  # what an older fxsketch pickled
    old = pickle.loads(pickle.dumps(old))
    assert old.timeline.storages == () and old.to_dict()["timeline"]["storages"] == []
    with pytest.raises(ConfigError, match="no storage lifetimes"):
        old.to_memory_viz(which="optimized")


spans = st.lists(st.tuples(st.integers(1, 5000), st.integers(0, 11), st.integers(0, 11), st.booleans()),
                 min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(spans)
def test_any_lifetimes_replay_to_the_sweeps_peak_without_overlap(rows):
    n = 12
    storages = tuple(StorageSpan(f"n{i}", "activation", "transient", size, min(a, b),
                                 n - 1 if kept else max(a, b), kept) for i, (size, a, b, kept) in enumerate(rows))
    live = live_bytes(n, ((s.nbytes, s.first, s.last) for s in storages))
    tl = TimelineData(tuple(("forward", f"n{t}") for t in range(n)), tuple(live), tuple({} for _ in live),
                      max(live), live.index(max(live)), storages)
    plan = MemoryPlan("m", 0, 0, tl, tl, (), ())
    snap = plan.to_memory_viz(which="optimized")
    peak, left = replay(snap["device_traces"][0])
    assert peak == max(live)
    check_segment(snap, 0, left)
