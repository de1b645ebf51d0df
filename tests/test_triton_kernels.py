"""Triton kernels of the probed conv against the torch reference in fxsketch.ops.probed.

Same seed -> same sketch, same Xhat, same dW estimate (float tolerance; buckets are bit-identical).
Without CUDA the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
in tests/conftest.py before triton is imported, unless the caller set it); with CUDA the same tests
run on CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton cannot be imported: the Triton kernels are untestable here")

import torch.nn.functional as F  # noqa: E402

from fxsketch.ops import probed as pc  # noqa: E402
from fxsketch.ops import triton_kernels as tk  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

PROBES = ("rademacher", "gaussian", "orthogonal")
DEVICES = [pytest.param(d, marks=pytest.mark.skipif(
    not tk.triton_available(d), reason=f"Triton kernels cannot run on {d} in this process "
    "(CPU needs TRITON_INTERPRET=1 before triton is imported; tests/conftest.py sets it)"))
    for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available()]
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
SPATIAL = {1: (10,), 2: (8, 8), 3: (4, 5, 4)}


def _x(shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# availability and errors


def test_triton_available_answers_for_devices_and_tensors():
    assert tk.triton_available("meta") is False
    assert tk.triton_available(torch.empty(1, device="meta")) is False
    assert tk.triton_available("cpu") == tk._interpret()


def test_use_triton_only_for_real_cuda_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert tk.use_triton(torch.zeros(2)) is False  # CPU keeps the torch path, even when interpreted
    with FakeTensorMode():
        fake = torch.empty(2, device="cuda") if torch.cuda.is_available() else torch.empty(2)
    assert tk.use_triton(fake) is False  # fxsketch plans on fake tensors: no kernel launch
    if torch.cuda.is_available():
        assert tk.use_triton(torch.zeros(2, device="cuda")) is True


def test_bad_arguments_raise_the_reference_errors():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        tk.sketch_triton(x, 0, 0, "spatial", "gaussian")
    with pytest.raises(ValueError, match="unknown probe"):
        tk.sketch_triton(x, 0, 2, "spatial", "uniform")


# --------------------------------------------------------------------------------------------
# forward: the sketch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("mode", ("spatial", "channel"))
@pytest.mark.parametrize("d", (1, 2, 3))
def test_sketch_matches_reference_fp32(device, probe, mode, d):
    x = _x((2, 3, *SPATIAL[d]), device)
    rank = 4 if mode == "spatial" else 8
    ref = pc.sketch(x, 1234, rank, mode, probe)
    out = tk.sketch_triton(x, 1234, rank, mode, probe)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("mode", ("spatial", "channel"))
def test_sketch_bf16_input_accumulates_in_fp32(device, probe, mode):
    x = _x((2, 3, 8, 8), device, torch.bfloat16)
    out = tk.sketch_triton(x, 99, 6, mode, probe)
    assert out.dtype == torch.bfloat16
    # fp32 accumulation: equal to the fp32 sketch of the same values up to one bf16 rounding
    # of the result (a bf16 accumulator would be off by far more over 64-192 terms).
    exact = pc.sketch(x.float(), 99, 6, mode, probe)
    torch.testing.assert_close(out.float(), exact, rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(out, pc.sketch(x, 99, 6, mode, probe), rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_sketch_fp16_and_strided_inputs(device):
    x = _x((2, 3, 8, 8), device)
    ref = pc.sketch(x, 5, 4, "spatial", "gaussian")
    cl = x.to(memory_format=torch.channels_last)  # read through its strides, no copy
    torch.testing.assert_close(tk.sketch_triton(cl, 5, 4, "spatial", "gaussian"), ref)
    every_other = _x((2, 6, 8, 8), device)[:, ::2]  # strided channels, still a (N, C, P) view
    torch.testing.assert_close(tk.sketch_triton(every_other, 5, 4, "channel", "gaussian"),
                               pc.sketch(every_other, 5, 4, "channel", "gaussian"))
    transposed = x.transpose(2, 3)  # no (N, C, P) view: copied once
    torch.testing.assert_close(tk.sketch_triton(transposed, 5, 4, "spatial", "rademacher"),
                               pc.sketch(transposed, 5, 4, "spatial", "rademacher"))
    half = x.half()
    torch.testing.assert_close(tk.sketch_triton(half, 5, 4, "spatial", "orthogonal").float(),
                               pc.sketch(half.float(), 5, 4, "spatial", "orthogonal"),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", (0, 1, 2**31 - 2, 0xDEADBEEF))
def test_sketch_seeds_whose_keys_span_32_bits(device, seed):
    # Stream keys >= 2**31 reach the kernel as int64 and must be truncated to uint32 exactly.
    x = _x((1, 2, 6, 6), device)
    for probe in PROBES:
        torch.testing.assert_close(tk.sketch_triton(x, seed, 5, "spatial", probe),
                                   pc.sketch(x, seed, 5, "spatial", probe), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ("spatial", "channel"))
def test_reconstruct_matches_reference(device, mode):
    x = _x((2, 3, 6, 6), device)
    for probe in PROBES:
        xbar = pc.sketch(x, 21, 5, mode, probe)
        ref = pc.reconstruct(xbar, 21, 5, mode, probe, x.shape, slice(1, 2))
        out = tk.reconstruct_triton(xbar, 21, 5, mode, probe, x.shape, slice(1, 2))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# backward: the dW estimate

# (d, kernel, stride, padding, dilation, groups, C, O)
GEOMETRIES = [
    (1, (3,), 1, 1, 1, 1, 3, 4),
    (1, (4,), 1, "same", 2, 1, 2, 3),
    (2, (3, 3), 1, 1, 1, 1, 3, 4),
    (2, (3, 3), 2, 1, 1, 1, 3, 4),
    (2, (3, 2), (1, 2), (2, 0), (2, 1), 1, 3, 2),
    (2, (4, 4), 1, "same", 1, 1, 2, 2),
    (2, (3, 3), 1, 1, 1, 2, 4, 6),
    (2, (1, 1), 1, 0, 1, 3, 3, 3),
    (3, (3, 3, 3), 1, 1, 1, 1, 2, 3),
    (3, (2, 3, 2), (2, 1, 1), (0, 1, 1), (1, 1, 2), 1, 2, 2),
]


def _dw_case(case, device, probe, rank=5, seed=77, dy_dtype=torch.float32):
    d, kernel, stride, padding, dilation, groups, c, o = case
    x = _x((2, c, *SPATIAL[d]), device)
    w = _x((o, c // groups, *kernel), device, seed=1)
    y = CONV[d](x, w, None, stride, padding, dilation, groups)
    dy = _x(tuple(y.shape), device, dy_dtype, seed=2)
    geo = pc.conv_geometry(tuple(w.shape), stride, padding, dilation, groups)
    xbar = pc.sketch(x, seed, rank, "spatial", probe)
    args = (dy, xbar, seed, rank, probe, tuple(x.shape[2:]), tuple(w.shape), geo)
    return args, x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("case", GEOMETRIES, ids=lambda c: f"{c[0]}d-k{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}-g{c[5]}")
def test_dw_spatial_matches_reference(device, probe, case):
    args, _ = _dw_case(case, device, probe)
    ref = pc.dw_spatial(*args)
    out = tk.dw_spatial_triton(*args)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_dw_spatial_chunks_over_samples_and_taps(device, monkeypatch):
    case = GEOMETRIES[3]
    args, _ = _dw_case(case, device, "gaussian")
    whole = tk.dw_spatial_triton(*args)
    o, rank = case[7], 5
    for cap in (o * rank * 9, o * rank * 4, 1):  # one sample per chunk; then taps split as well
        monkeypatch.setattr(tk, "B_CHUNK_ELEMS", cap)
        torch.testing.assert_close(tk.dw_spatial_triton(*args), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_dw_spatial_bf16_grad_output(device):
    args, _ = _dw_case(GEOMETRIES[2], device, "rademacher", dy_dtype=torch.bfloat16)
    torch.testing.assert_close(tk.dw_spatial_triton(*args), pc.dw_spatial(*args), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_dw_spatial_full_rank_orthogonal_is_exact(device):
    # rank = pixels with balanced buckets: Z is a signed permutation, Z Z^T = I, dW is exact.
    case = GEOMETRIES[2]
    args, x = _dw_case(case, device, "orthogonal", rank=64)
    dy, w_shape, geo = args[0], args[6], args[7]
    torch.testing.assert_close(tk.dw_spatial_triton(*args), pc.exact_weight_grad(dy, x, w_shape, geo),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [GEOMETRIES[3], GEOMETRIES[6], GEOMETRIES[8]], ids=("2d-s2", "2d-g2", "3d"))
def test_dw_channel_matches_reference(device, case):
    d, kernel, stride, padding, dilation, groups, c, o = case
    args, x = _dw_case(case, device, "gaussian")
    dy, w_shape, geo = args[0], args[6], args[7]
    xbar = pc.sketch(x, 8, 16, "channel", "gaussian")
    cargs = (dy, xbar, 8, 16, "gaussian", tuple(x.shape), w_shape, geo)
    torch.testing.assert_close(tk.dw_channel_triton(*cargs), pc.dw_channel(*cargs), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# compiled mode: the interpreter skips Triton's type checks and lowering, so compile to sm_90
# (PTX and cubin with the ptxas shipped in the triton wheel; no GPU needed) in a subprocess
# where TRITON_INTERPRET is off.

_COMPILE_SCRIPT = r'''
import inspect, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from fxsketch.ops import triton_kernels as tk
tk._build()
const = {"PROBE": None, "CHANNEL": False, "BLOCK_R": 4, "BLOCK_C": 256}
# every probe kind through the dW kernel; the other two (sharing _probe) with Gaussian probes
for name, probes in (("_dw_scatter_kernel", (0, 1, 2)), ("_sketch_kernel", (1,)), ("_reconstruct_kernel", (1,))):
    fn = getattr(tk, name)
    params = list(inspect.signature(fn.fn).parameters)
    for probe in probes:
        const["PROBE"] = probe
        sig, consts = {}, {}
        for i, p in enumerate(params):
            if p in const:
                sig[p], consts[(i,)] = "constexpr", const[p]
            elif p.endswith("_ptr"):
                sig[p] = "*bf16" if p in ("x_ptr", "dy_ptr") else "*fp32"
            else:  # keys >= 2**31 arrive as i64, strides may too
                sig[p] = "i64" if p.startswith(("key_v", "sN")) else "i32"
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
print("compiled")
'''


def test_kernels_compile_for_cuda_sm90(tmp_path):
    import subprocess
    import sys

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton wheel ships no ptxas: cannot compile CUDA kernels without a GPU toolchain")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
