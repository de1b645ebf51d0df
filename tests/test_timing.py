"""passes.timing.op_extra_seconds: the sub-batch an op pair is timed on, and its layout."""
import torch

from fxsketch.passes import diskcache, timing


def _seen(monkeypatch, tmp_path, shape, **kw):
    """(shapes, channels_last flags) the replacement was called on, and the cache keys written."""
    monkeypatch.setenv("FXSKETCH_CACHE", str(tmp_path))
    calls = []

    def replacement(x):
        calls.append((tuple(x.shape), x.dim() == 4 and not x.is_contiguous()
                      and x.is_contiguous(memory_format=torch.channels_last)))
        return x * 2
    out = timing.op_extra_seconds("test:double", shape, torch.float32, torch.device("cpu"),
                                  lambda x: x * 1, replacement, repeat=1, **kw)
    assert out >= 0
    return calls, list(diskcache.read("timing"))


def test_cut_to_elements_and_scaled(monkeypatch, tmp_path):
    calls, keys = _seen(monkeypatch, tmp_path, (64, 4, 16, 16), elements=2048)
    assert {s for s, _ in calls} == {(2, 4, 16, 16)}  # 2048 elements: 2 samples of 1024
    assert not any(cl for _, cl in calls)
    assert len(keys) == 1 and "[2, 4, 16, 16]" in keys[0]


def test_min_samples_where_they_fit(monkeypatch, tmp_path):
    calls, _ = _seen(monkeypatch, tmp_path, (64, 4, 16, 16), elements=512, min_samples=2)
    assert {s for s, _ in calls} == {(2, 4, 16, 16)}  # the cap alone would time one sample
    calls, _ = _seen(monkeypatch, tmp_path / "b", (1, 4, 16, 16), elements=512, min_samples=2)
    assert {s for s, _ in calls} == {(1, 4, 16, 16)}  # never more than the batch


def test_min_samples_not_past_op_elements(monkeypatch, tmp_path):
    per = timing.OP_ELEMENTS // 2 + 1  # two samples would pass OP_ELEMENTS
    calls, _ = _seen(monkeypatch, tmp_path, (4, per), elements=1024, min_samples=2)
    assert {s for s, _ in calls} == {(1, per)}


def test_channels_last_stride_times_channels_last(monkeypatch, tmp_path):
    t = torch.empty(8, 4, 16, 16, device="meta").contiguous(memory_format=torch.channels_last)
    calls, keys = _seen(monkeypatch, tmp_path, t.shape, stride=t.stride())
    assert calls and all(cl for _, cl in calls)
    assert "channels_last" in keys[0]
    calls, keys2 = _seen(monkeypatch, tmp_path / "b", t.shape, stride=t.contiguous().stride())
    assert not any(cl for _, cl in calls) and "channels_last" not in keys2[0]


def test_memory_format_of():
    t = torch.empty(2, 3, 4, 5)
    assert timing.memory_format_of(t.shape, t.stride()) is None
    assert timing.memory_format_of(t.shape, t.contiguous(memory_format=torch.channels_last).stride()) \
        == torch.channels_last
    u = torch.empty(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    assert timing.memory_format_of(u.shape, u.stride()) == torch.channels_last_3d
    assert timing.memory_format_of((2, 3), (3, 1)) is None
    assert timing.memory_format_of(t.shape, None) is None


def test_times_taken_on_a_loaded_machine_are_used_but_not_cached(monkeypatch, tmp_path):
    # a plan timed while another process ran on the same cores (13x in one session): its node times
    # and op prices are not kept, and the plan says so
    import fxsketch
    from torch import nn
    monkeypatch.setenv("FXSKETCH_CACHE", str(tmp_path))
    monkeypatch.setattr(timing, "slowdown", lambda device: 6.0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    x = torch.randn(4, 3, 16, 16)
    plan = fxsketch.plan(model, (x,), None, optimized=True, methods=("lean", "probe"), calibrate=False,
                         progress=False, workspace="off")
    assert any("6.0x slower" in n for n in plan.notes), plan.notes
    assert not any(k.startswith(f"v{timing.VERSION}|") for k in diskcache.read("timing"))
    monkeypatch.setattr(timing, "slowdown", lambda device: 1.1)  # quiet again: timed and kept
    plan = fxsketch.plan(model, (x,), None, optimized=True, methods=("lean", "probe"), calibrate=False,
                         progress=False, workspace="off")
    assert not any("slower" in n for n in plan.notes)
    assert any(k.startswith(f"v{timing.VERSION}|") for k in diskcache.read("timing"))


def test_slowdown_is_against_the_fastest_seen_and_allocates_little(monkeypatch, tmp_path):
    from fxsketch.measurement import LiveStorageTracker
    monkeypatch.setenv("FXSKETCH_CACHE", str(tmp_path))
    with LiveStorageTracker() as tr:
        assert timing.slowdown(torch.device("cpu")) == 1.0  # the first call sets the reference
        again = [timing.slowdown(torch.device("cpu")) for _ in range(5)]
    assert all(0 < s < timing.LOADED for s in again)
    assert tr.peak_bytes <= 3 * 4 * 128 * 128  # planning stays within the plan's memory (test_planning.py)
    fastest = next(v["seconds"] for k, v in diskcache.read("device").items() if "reference matmul" in k)
    monkeypatch.setattr(timing, "_reference_seconds", lambda dev: 6.0 * fastest)
    assert abs(timing.slowdown(torch.device("cpu")) - 6.0) < 1e-6
