"""Lean ReLU / leaky ReLU / max pool: same outputs and gradients as torch, and they save only a
bit mask or window offsets."""
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fxsketch.ops import lean_leaky_relu, lean_max_pool, lean_relu
from fxsketch.ops.lean import pack_bits, unpack_bits

POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _saved(fn, *args, **kwargs):
    """Output of fn and the tensors autograd saved for its backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(*args, **kwargs)
    return out, saved


@settings(max_examples=20, deadline=None)
@given(n=st.integers(0, 40))
def test_pack_unpack_roundtrip(n):
    mask = torch.rand(n) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    assert torch.equal(unpack_bits(packed, n), mask)


@pytest.mark.parametrize("fn,ref", [
    (lean_relu, F.relu),
    (lambda x, **k: lean_leaky_relu(x, 0.2, **k), lambda x: F.leaky_relu(x, 0.2)),
])
def test_relus_match_torch_and_save_only_mask(fn, ref):
    x = torch.randn(3, 5, 7, requires_grad=True)
    x_zero = x.detach().clone()
    x_zero[0, 0, :3] = 0.0  # torch's gradient rule at exactly 0 must match too
    x_zero.requires_grad_(True)
    for inp in (x, x_zero):
        out, saved = _saved(fn, inp)
        want = ref(inp)
        torch.testing.assert_close(out, want)
        g = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, inp, g)[0], torch.autograd.grad(want, inp, g)[0])
        assert len(saved) == 1 and saved[0].dtype == torch.uint8
        assert saved[0].numel() == math.ceil(inp.numel() / 8)


def test_gradcheck_float64():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lean_relu, (x,))
    assert torch.autograd.gradcheck(lambda t: lean_leaky_relu(t, 0.3), (x,))
    xp = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lean_max_pool(t, 3, 2, 1), (xp,))


def test_inplace_leaky_with_negative_slope():
    x = torch.randn(10, requires_grad=True)
    got_in = x.detach().clone().requires_grad_(True)
    y = lean_leaky_relu(got_in * 1.0, -0.5, inplace=True)
    torch.testing.assert_close(y, F.leaky_relu(x, -0.5))
    g = torch.randn(10)
    torch.testing.assert_close(torch.autograd.grad(y, got_in, g)[0],
                               torch.where(x > 0, g, -0.5 * g))


class _Block(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)
        self.act = act

    def forward(self, x):
        return self.conv2(self.act(self.bn(self.conv1(x))))


@pytest.mark.parametrize("lean,eager", [
    (lambda t: lean_relu(t, inplace=True), lambda t: F.relu(t, inplace=True)),
    (lambda t: lean_leaky_relu(t, 0.1, inplace=True), lambda t: F.leaky_relu(t, 0.1, inplace=True)),
])
def test_inplace_in_conv_bn_block_matches_eager(lean, eager):
    torch.manual_seed(0)
    ref = _Block(eager)
    mod = _Block(lean)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 9, 9)
    out_ref, out = ref(x), mod(x)
    torch.testing.assert_close(out, out_ref)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), mod.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_inplace_on_leaf_is_refused_like_torch():
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="in-place"):
        lean_relu(x, inplace=True)


@st.composite
def pool_cases(draw):
    d = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    size = tuple(dl * (k - 1) + 1 + draw(st.integers(0, {1: 8, 2: 5, 3: 3}[d]))
                 for k, dl in zip(kernel, dilation))
    return d, kernel, stride, padding, dilation, draw(st.booleans()), size


@settings(max_examples=40, deadline=None)
@given(case=pool_cases(), unbatched=st.booleans())
def test_max_pool_matches_torch_and_saves_small_offsets(case, unbatched):
    d, kernel, stride, padding, dilation, ceil_mode, size = case
    shape = ((3,) if unbatched else (2, 3)) + size
    x = torch.randn(shape, requires_grad=True)
    args = (kernel, stride, padding, dilation, ceil_mode)
    out, saved = _saved(lean_max_pool, x, *args)
    want = POOL[d](x, *args)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(want, x, g)[0])
    assert len(saved) == 1 and saved[0].dtype == torch.uint8 and saved[0].numel() == out.numel()


def test_max_pool_int_kernel_and_large_window_dtype():
    x = torch.randn(1, 2, 40, 40, requires_grad=True)
    out, saved = _saved(lean_max_pool, x, 17, 5)  # 289 window elements: more than uint8 holds
    torch.testing.assert_close(out, F.max_pool2d(x, 17, 5))
    assert saved[0].dtype == torch.int16
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0],
                               torch.autograd.grad(F.max_pool2d(x, 17, 5).sum(), x)[0])


def test_max_pool_clear_errors():
    with pytest.raises(ValueError, match="3-5 dims"):
        lean_max_pool(torch.randn(4, 4), 2)
    with pytest.raises(ValueError, match="kernel_size"):
        lean_max_pool(torch.randn(1, 1, 4, 4), (2, 2, 2, 2, 2))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("slope", [None, 0.1])
def test_channels_last_relu_packs_in_memory_order_without_copies(slope, inplace):
    """A channels_last activation's mask is packed as the tensor lies, and its gradient comes back
    in that layout: no copy of x or of the gradient into logical order, gradients as torch's."""
    from fxsketch.measurement import LiveStorageTracker
    x = torch.randn(4, 16, 16, 16).contiguous(memory_format=torch.channels_last)
    fn = (lambda t: lean_relu(t, inplace)) if slope is None else (lambda t: lean_leaky_relu(t, slope, inplace))
    ref = (lambda t: F.relu(t)) if slope is None else (lambda t: F.leaky_relu(t, slope))
    leaf, leaf_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = leaf * 1.0, leaf_ref * 1.0  # non-leaf, channels_last
    with LiveStorageTracker(resident=[a]) as tr:  # a's storage counted once, not again as a view's
        out = fn(a)
    assert torch.equal(out, ref(b)) and out.is_contiguous(memory_format=torch.channels_last)
    x_bytes = 4 * x.numel()
    assert tr.peak_bytes - x_bytes - (0 if inplace else x_bytes) < x_bytes // 2  # a copy of x would be x_bytes more
    layouts = []
    a.register_hook(lambda grad: layouts.append(grad.is_contiguous(memory_format=torch.channels_last)))
    g = torch.randn_like(x)  # channels_last as well
    out.backward(g)
    assert layouts == [True]
    ref(b).backward(g)
    assert torch.equal(leaf.grad, leaf_ref.grad)


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.channels_last_3d])
def test_channels_last_max_pool_keeps_the_layout_and_torchs_gradient(fmt):
    d = 2 if fmt == torch.channels_last else 3
    x = torch.randn(3, 5, *[9] * d).contiguous(memory_format=fmt).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    pool = F.max_pool2d if d == 2 else F.max_pool3d
    y, want = lean_max_pool(x, (3,) * d, 2, 1), pool(ref, 3, 2, 1)
    assert torch.equal(y, want) and y.is_contiguous(memory_format=fmt)
    g = torch.randn_like(want)
    y.backward(g)
    want.backward(g)
    assert torch.equal(x.grad, ref.grad) and x.grad.is_contiguous(memory_format=fmt)


def test_relu_backward_holds_one_unpacked_mask_chunk_at_a_time(monkeypatch):
    """The torch path (no compiled loops): besides its result, the backward holds one chunk's mask
    in the gradient's dtype (and its int32 indices: 1/8 more), not the previous chunk's as well."""
    from fxsketch.measurement import LiveStorageTracker
    monkeypatch.setenv("FXSKETCH_CPU_KERNELS", "0")
    from fxsketch.ops.lean import mask_chunk
    x = torch.randn(8, 16, 32, 32)
    mask, g = pack_bits(x > 0), torch.randn_like(x)
    with LiveStorageTracker([mask, g]) as tr:
        out = torch.ops.fxsketch.lean_relu_backward(g, mask, None, [0, 1, 2, 3])
    assert tr.peak_bytes - tr.resident_bytes - out.nbytes <= 1.2 * 4 * mask_chunk(x.numel())


def test_custom_ops_pass_opcheck():
    """Schema, fake vs real outputs, autograd registration and AOT dispatch with dynamic shapes
    for every fxsketch::lean_* op (the in-place one declares its mutation)."""
    ops = torch.ops.fxsketch
    x = torch.randn(3, 5, 4)
    for slope in (None, 0.2):
        torch.library.opcheck(ops.lean_relu.default, (x.clone().requires_grad_(True), slope))
        torch.library.opcheck(ops.lean_relu_inplace.default, (x.clone(), slope))
        torch.library.opcheck(ops.lean_relu_backward.default, (torch.randn_like(x), pack_bits(x > 0), slope, [0, 1, 2]))
    xp = torch.randn(2, 3, 7, 6, requires_grad=True)
    args = ([3, 2], [2, 2], [1, 1], [1, 1], True)
    torch.library.opcheck(ops.lean_max_pool.default, (xp,) + args)
    out, offset = ops.lean_max_pool(xp.detach(), *args)
    torch.library.opcheck(ops.lean_max_pool_backward.default,
                          (torch.randn_like(out), offset, list(xp.shape)) + args[:4] + ([0, 1, 2, 3],))
    xc = xp.detach().contiguous(memory_format=torch.channels_last)
    out, offset = ops.lean_max_pool(xc, *args)
    torch.library.opcheck(ops.lean_max_pool_backward.default,
                          (torch.randn_like(out), offset, list(xp.shape)) + args[:4] + ([0, 2, 3, 1],))


def test_ops_run_on_fake_tensors_with_the_right_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(2, 3, 9, 8, requires_grad=True)
        y = lean_max_pool(lean_leaky_relu(x * 1.0, 0.1, inplace=True), (3, 2), 2, 1, ceil_mode=True)
        (dx,) = torch.autograd.grad(y.sum(), x)
    assert tuple(y.shape) == tuple(F.max_pool2d(torch.randn(2, 3, 9, 8), (3, 2), 2, 1, ceil_mode=True).shape)
    assert dx.shape == x.shape


def test_double_backward_through_lean_relu_equals_eager():
    # a gradient penalty: the lean ReLU's backward is linear in its incoming gradient
    torch.manual_seed(0)
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    grads = []
    for relu in (lambda t: lean_relu(t), torch.relu, lambda t: lean_leaky_relu(t, 0.1)):
        out = relu(x @ w).pow(2).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.pow(2).sum(), w)
        grads.append(gw)
    torch.testing.assert_close(grads[0], grads[1])
    x2 = x.detach().requires_grad_()
    out = F.leaky_relu(x2 @ w, 0.1).pow(2).sum()
    (gx,) = torch.autograd.grad(out, x2, create_graph=True)
    torch.testing.assert_close(grads[2], torch.autograd.grad(gx.pow(2).sum(), w)[0])


def test_double_backward_through_lean_max_pool_names_the_op_and_the_fix():
    import fxsketch
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = lean_max_pool(x * 2, 2).pow(2).sum()
    with pytest.raises(fxsketch.UnsupportedError, match=r"lean_max_pool does not support double backward.*methods="):
        torch.autograd.grad(out, x, create_graph=True)


# The fused CPU loops (fxsketch.ops.cpu_kernels.fx_relu_mask / fx_relu_backward) against torch

def _fused_built() -> bool:
    from fxsketch.ops import cpu_kernels as K
    if K._compiler() is None or os.environ.get("FXSKETCH_CPU_KERNELS") == "0":
        assert not K.serves("cpu", torch.float32)  # the torch path, tested everywhere above
        return False
    assert K.serves("cpu", torch.float32), "a C compiler is on PATH but the loops did not build"
    return True


def _special(shape, fmt=None) -> torch.Tensor:
    """randn with -0.0, +0.0, NaN, +-inf and subnormals sprinkled in, laid out in ``fmt``."""
    torch.manual_seed(math.prod(shape))
    x = torch.randn(shape)
    flat = x.view(-1)
    for k, v in enumerate([-0.0, 0.0, math.nan, math.inf, -math.inf, 1e-40, -1e-40]):
        flat[k::11] = v
    return x if fmt is None else x.contiguous(memory_format=fmt)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


SPECIAL_SHAPES = [(3, 5, 7), (2, 16, 33, 17), (1, 65536 * 2 + 13), (5,), ()]


@pytest.mark.parametrize("shape", SPECIAL_SHAPES)
@pytest.mark.parametrize("slope", [None, 0.1, 0.0, -0.5])
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_relu_is_torchs_bit_for_bit_with_its_mask(shape, slope, inplace, monkeypatch):
    """Output, mask and input gradient of the fused loops equal torch's relu / leaky_relu bit for
    bit at -0.0, NaN, infinities and subnormals (a NaN gradient too), any size (a partial last
    mask byte, past one task of 65536); the mask equals the torch path's ignoring pad bits, and
    the loops' pad bits are 0."""
    if not _fused_built():
        return
    x = _special(shape)
    g = _special(shape).neg_()
    fn = (lambda t: lean_relu(t, inplace)) if slope is None else (lambda t: lean_leaky_relu(t, slope, inplace))
    ref = (lambda t: F.relu(t)) if slope is None else (lambda t: F.leaky_relu(t, slope))
    grads, masks = [], []
    for env in ("1", "0"):  # the fused loops, then the torch path
        monkeypatch.setenv("FXSKETCH_CPU_KERNELS", env)
        leaf = x.clone().requires_grad_(True)
        out, saved = _saved(fn, leaf * 1.0)
        masks.append(next(t for t in saved if t.dtype == torch.uint8))
        assert torch.equal(_bits(out), _bits(ref(x)))
        out.backward(g)
        grads.append(leaf.grad)
    leaf = x.clone().requires_grad_(True)
    ref(leaf * 1.0).backward(g)
    assert torch.equal(_bits(grads[0]), _bits(leaf.grad)) and torch.equal(_bits(grads[1]), _bits(leaf.grad))
    n = x.numel()
    keep = unpack_bits(masks[0], n)
    assert torch.equal(keep, unpack_bits(masks[1], n))
    assert torch.equal(keep, (~(x <= 0) if slope is None else x > 0).reshape(-1))
    if n % 8:
        assert int(masks[0][-1]) >> (n % 8) == 0


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.channels_last_3d])
def test_fused_relu_walks_channels_last_as_it_lies(fmt):
    """A channels_last(_3d) input: the mask in memory order (what the torch path packs), the
    output and gradient laid out as the input, values torch's."""
    if not _fused_built():
        return
    shape = (2, 6, 5, 7) if fmt == torch.channels_last else (2, 6, 3, 5, 7)
    x = _special(shape, fmt)
    leaf = x.clone().requires_grad_(True)
    a = leaf * 1.0
    out, saved = _saved(lean_relu, a)
    (mask,) = saved
    assert out.is_contiguous(memory_format=fmt) and torch.equal(_bits(out), _bits(F.relu(x)))
    lying = x.permute(0, *range(2, x.dim()), 1).reshape(-1)
    assert torch.equal(unpack_bits(mask, x.numel()), ~(lying <= 0))
    g = _special(shape, fmt)
    out.backward(g)
    assert leaf.grad.is_contiguous(memory_format=fmt)
    assert torch.equal(_bits(leaf.grad), _bits(torch.where(x <= 0, 0.0, g)))


@pytest.mark.parametrize("inplace", [False, True])
def test_fused_relu_allocates_only_its_results(inplace):
    """Forward: the output (none in place) and the mask; backward: the input gradient. No
    temporaries, and the fake op (what a plan sees) allocates the same."""
    if not _fused_built():
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fxsketch.measurement import LiveStorageTracker
    from fxsketch.ops.lean import relu_workspace
    x = torch.randn(4, 8, 32, 33)
    n = x.numel()
    op = torch.ops.fxsketch.lean_relu_inplace if inplace else torch.ops.fxsketch.lean_relu
    with LiveStorageTracker([x]) as tr:
        op(x, None)
    assert tr.peak_bytes - tr.resident_bytes == (n + 7) // 8 + (0 if inplace else 4 * n)
    mask, g = pack_bits(x > 0), torch.randn_like(x)
    with LiveStorageTracker([mask, g]) as tr:
        torch.ops.fxsketch.lean_relu_backward(g, mask, None, [0, 1, 2, 3])
    assert tr.peak_bytes - tr.resident_bytes == 4 * n
    assert relu_workspace(n, torch.float32, "cpu") == (0, 0) == relu_workspace(n, torch.float32, "meta")
    assert relu_workspace(n, torch.float32, "cuda") != (0, 0)
    with FakeTensorMode():
        fx_ = torch.empty(4, 8, 32, 33)
        out, fmask = torch.ops.fxsketch.lean_relu(fx_, None)
        assert fmask.shape == ((n + 7) // 8,) and out.stride() == x.stride()
