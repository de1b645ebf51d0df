"""The fused CPU loops of the quantized saves (fxsketch.ops.cpu_kernels): the same bits as their
torch reference, whatever the threads; the ops' fused path equal to that reference and to the torch
path's dequantization; unbiased rounding; the workspace the planner counts; the fallback."""
import math
import os

import pytest
import torch

from fxsketch.ops import cpu_kernels as K
from fxsketch.ops import quant as Q

SHAPES = [  # (L, M, T): one statistic per run (T = 1) or a row of them; odd sizes; past one task
    (3, 4097, 1), (5, 777, 13), (2, 9, 64), (1, 40001, 3), (7, 1, 1), (4, 3, 1025),
]


def _lib():
    if K._compiler() is None or os.environ.get("FXSKETCH_CPU_KERNELS") == "0":  # the torch path
        assert K.library() is None and not Q.fused("cpu", torch.float32)
        return None
    assert K.library() is not None, "a C compiler is on PATH but the loops did not build"
    return K.library()


def test_loops_build_or_fall_back():
    lib = _lib()
    assert (lib is not None) == Q.fused("cpu", torch.float32)
    assert not Q.fused("cpu", torch.bfloat16) and not Q.fused("cuda", torch.float32)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_loops_match_their_torch_reference_bit_for_bit_at_any_thread_count(shape, bits):
    if _lib() is None:
        return
    torch.manual_seed(sum(shape) + bits)
    x3 = torch.randn(shape) * torch.rand(shape[0], 1, shape[2]) * 3
    levels = (1 << bits) - 1
    lo, step = K.group_range(x3, levels)
    lo_t, step_t = Q._range(x3, [shape[0], 1, shape[2]], levels)
    assert torch.equal(lo, lo_t.view_as(lo)) and torch.equal(step, step_t.view_as(step))
    off, inv = lo - step / (2 * Q.RNG_LEVELS), step.reciprocal()
    key = K.mix32_key(123456789123)
    want = K.reference_pack(x3, off, inv, key, bits)
    threads = torch.get_num_threads()
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        try:
            out = torch.empty((x3.numel() * bits + 7) // 8, dtype=torch.uint8)
            K.pack(x3, off, inv, out, key, bits)
            assert torch.equal(out, want), n
            back = torch.empty_like(x3)
            K.unpack(out, lo, step, back, bits)
        finally:
            torch.set_num_threads(threads)
        q = out if bits == 8 else torch.stack([out & 15, out >> 4], 1).flatten()[:x3.numel()]
        assert torch.equal(back, q.view(shape).float() * step.view(shape[0], 1, -1) + lo.view(shape[0], 1, -1))


def test_hash_bits_are_uniform_and_change_with_the_key():
    r = K.reference_bits(0, 1 << 18, K.mix32_key(7))
    assert 0 <= int(r.min()) and int(r.max()) < 1 << 16
    counts = torch.bincount(r >> 12, minlength=16).double()  # 16 bins of 4096 values
    assert float(((counts - counts.mean()) ** 2 / counts.mean()).sum()) < 50  # chi-square, 15 dof
    assert not torch.equal(r, K.reference_bits(0, 1 << 18, K.mix32_key(8)))
    assert abs(float(r[0::2].double().mean() - r[1::2].double().mean())) < 300  # both halves of a word alike


@pytest.mark.parametrize("bits", [8, 4])
def test_the_ops_fused_path_rounds_unbiased_and_dequantizes_as_the_torch_path(monkeypatch, bits):
    if _lib() is None:
        return
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 7)
    groups = Q.quant_groups(x.shape, "batch")
    draws = [Q._pack_impl(x, torch.tensor(s), bits, groups) for s in range(400)]
    codes, lo, step = draws[0]
    back = torch.stack([Q._unpack_impl(c, a, b, bits, list(x.shape), torch.float32) for c, a, b in draws])
    assert float((back - x).abs().max()) <= float(step.max()) * (1 + 1e-6)  # a neighbour on the grid
    err = back.mean(0) - x
    sd = step.expand_as(x) / 2 / math.sqrt(len(draws))  # f (1 - f) <= 1/4
    assert float((err.abs() / sd).max()) < 5  # each element within 5 standard errors
    assert abs(float((err / sd).mean())) < 5 / math.sqrt(x.numel())  # and no bias on average
    monkeypatch.setenv("FXSKETCH_CPU_KERNELS", "0")
    assert not Q.fused("cpu", torch.float32)
    t_codes, t_lo, t_step = Q._pack_impl(x, torch.tensor(0), bits, groups)
    assert torch.equal(t_lo, lo) and torch.equal(t_step, step)  # same range; codes from another RNG
    assert torch.equal(Q._unpack_impl(codes, lo, step, bits, list(x.shape), torch.float32), back[0])


def test_fused_packing_allocates_its_outputs_and_two_statistics_per_group():
    if _lib() is None:
        return
    from fxsketch.measurement import LiveStorageTracker
    x = torch.randn(8, 32, 40, 40).contiguous(memory_format=torch.channels_last)
    order = Q.pack_order("batch", x.shape, x.stride())
    xo = x.permute(order)
    groups = [Q.quant_groups(x.shape, "batch")[d] for d in order]
    seed = torch.tensor(1)
    for bits in (8, 4):
        with LiveStorageTracker([x]) as tr:
            codes, lo, step = Q._pack_impl(xo, seed, bits, groups)
        outputs = codes.nbytes + lo.nbytes + step.nbytes
        assert tr.peak_bytes - x.nbytes == outputs + Q.pack_workspace_nbytes(list(xo.shape), bits, groups)
        with LiveStorageTracker([codes, lo, step]) as tr:
            back = Q._unpack_impl(codes, lo, step, bits, list(xo.shape), torch.float32)
        assert tr.peak_bytes - tr.resident_bytes == back.nbytes + Q.unpack_workspace_nbytes(list(xo.shape), bits, groups)


def test_disabled_loops_give_the_torch_path(monkeypatch):
    monkeypatch.setenv("FXSKETCH_CPU_KERNELS", "0")
    assert K.library() is None and not Q.fused("cpu", torch.float32)
    x = torch.randn(3, 4, 9)
    codes, lo, step = Q._pack_impl(x, torch.tensor(5), 8, [3, 4, 1])
    back = Q._unpack_impl(codes, lo, step, 8, [3, 4, 9], torch.float32)
    assert float((back - x).abs().max()) <= float(step.max()) * (1 + 1e-6)


BN_CASES = [  # (shape, memory format): channels as T, one channel per row, batch 1, odd sizes
    ((6, 8, 10, 14), torch.channels_last), ((6, 8, 10, 14), None), ((3, 5, 4, 6, 7), torch.channels_last_3d),
    ((3, 5, 4, 6, 7), None), ((1, 6, 50, 7), None), ((4, 3, 1, 1), torch.channels_last),
    ((2, 16, 2100, 1), torch.channels_last),  # past one SUM_BLOCK of rows
    ((2, 3, 5, 7), None), ((3, 2, 300, 1), None),  # rows of odd length (4-bit codes start mid-byte), past DECODE
]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape, fmt", BN_CASES)
def test_fused_batch_norm_backward_equals_the_torch_paths_on_the_same_codes(monkeypatch, shape, fmt, bits):
    """A training BatchNorm's backward from the codes (no dequantized X in memory) gives the
    gradients of the torch path (X dequantized, torch's kernel) on the same codes to fp32 rounding,
    dX laid out as X, and holds no more than its stated workspace beside dY and the gradients."""
    if _lib() is None:
        return
    from fxsketch.measurement import LiveStorageTracker
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 3
    x = x if fmt is None else x.contiguous(memory_format=fmt)
    c = shape[1]
    order = Q.pack_order("batch", x.shape, x.stride())
    assert Q.fused_bn_layout(shape, order, bits, "cpu", torch.float32) is not None
    w = torch.linspace(0.5, 1.5, c).requires_grad_()
    b = torch.zeros(c, requires_grad=True)
    t = x.clone().requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: kept.append(s) or s, lambda s: s):
        y = Q.quant_batch_norm(t, None, None, w, b, True, bits=bits)
    dy = torch.randn(shape).contiguous(memory_format=fmt or torch.contiguous_format)
    with LiveStorageTracker([t, w, b, dy] + kept) as tr:
        got = torch.autograd.grad(y, (t, w, b), dy, retain_graph=True)
    held = tr.peak_bytes - tr.resident_bytes - sum(g.nbytes for g in got)
    groups = Q.quant_groups(shape, "batch")
    assert held <= Q.backward_workspace_nbytes("batch", shape, bits, groups, order=order), held
    monkeypatch.setenv("FXSKETCH_CPU_KERNELS", "0")  # the same codes, the torch path's backward
    want = torch.autograd.grad(y, (t, w, b), dy)
    assert got[0].stride() == want[0].stride() == t.stride() or got[0].is_contiguous(memory_format=fmt)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=2e-5 * float(e.abs().max()))


def test_fused_batch_norm_backward_is_skipped_in_eval_mode_and_for_other_norms():
    """Running statistics (eval) and 2-dim inputs keep the torch path; the planner's workspace
    follows (a chunk of X there, the small per-channel buffers where the loops run)."""
    if _lib() is None:
        return
    shape = (16, 64, 56, 56)
    groups = Q.quant_groups(shape, "batch")
    fused = Q.backward_workspace_nbytes("batch", shape, 8, groups, batch_stats=True)
    torch_path = Q.backward_workspace_nbytes("batch", shape, 8, groups, batch_stats=False)
    assert fused < 64 * 1024 < 4 * math.prod(shape) // 16 <= torch_path
    assert Q.fused_bn_layout((64, 6), [0, 1], 8, "cpu", torch.float32) is None
    assert Q.fused_bn_layout(shape, [0, 1, 2, 3], 8, "cuda", torch.float32) is None
