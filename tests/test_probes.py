"""Probe construction: the hash matches uint32 arithmetic, buckets/values follow their rules,
E[Z Z^T] = I (checked through E[Xhat] = X), and the rank helpers."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxsketch.ops.probed import reconstruct, sketch
from fxsketch.ops.probes import (PROBES, mix32, probe_buckets_and_values, rank_for_ratio,
                                 sketch_nbytes, sketch_shape, stream_key)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _mix32_reference(x: int) -> int:
    """lowbias32 written the plain uint32 way (products wrap mod 2**32), as a kernel would."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_mix32_tensor_equals_uint32_reference():
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    values += torch.randint(0, 2**32, (200,), dtype=torch.int64).tolist()
    got = mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_mix32_reference(v) for v in values]
    assert [mix32(v) for v in values] == got  # the python-int path used for keys agrees


@pytest.mark.parametrize("probe", PROBES)
def test_buckets_in_range_and_values_follow_rule(probe):
    q = torch.arange(5000)
    bucket, value = probe_buckets_and_values(3, q, 7, probe)
    assert bucket.dtype == torch.int64 and value.dtype == torch.float32
    assert int(bucket.min()) >= 0 and int(bucket.max()) < 7
    if probe == "gaussian":
        assert abs(float(value.mean())) < 0.1 and abs(float(value.var()) - 1) < 0.1
    else:
        assert set(value.unique().tolist()) == {-1.0, 1.0}
    # Hashes are pure functions of (seed, position): a subset gives the same answer.
    b2, v2 = probe_buckets_and_values(3, q[100:200], 7, probe)
    assert torch.equal(b2, bucket[100:200]) and torch.equal(v2, value[100:200])


def test_orthogonal_blocks_map_bijectively():
    rank = 6
    bucket, _ = probe_buckets_and_values(11, torch.arange(rank * 50), rank, "orthogonal")
    for block in bucket.view(50, rank):
        assert sorted(block.tolist()) == list(range(rank))


def test_seed_changes_probes():
    q = torch.arange(64)
    assert not torch.equal(probe_buckets_and_values(1, q, 8, "rademacher")[0],
                           probe_buckets_and_values(2, q, 8, "rademacher")[0])
    assert stream_key(1, 0) != stream_key(1, 1)


@settings(max_examples=6, deadline=None)
@given(probe=st.sampled_from(PROBES), mode=st.sampled_from(["spatial", "channel"]),
       rank=st.integers(1, 9), size=st.integers(3, 6))
def test_reconstruction_is_unbiased(probe, mode, rank, size):
    """E[Z Z^T X] = X: the whole unbiasedness argument in one line."""
    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64)
    draws = torch.stack([reconstruct(sketch(x, s, rank, mode, probe), s, rank, mode, probe, x.shape)
                         for s in range(400)]).double()
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert ((mean - x).abs() <= 5 * stderr + 1e-4).all()


def test_rank_helpers():
    shape = (8, 64, 56, 56)
    assert sketch_shape(shape, 196, "spatial") == (8, 64, 196)
    assert sketch_shape(shape, 196, "channel") == (8, 196)
    assert sketch_nbytes(shape, 196, "spatial", torch.bfloat16) == 8 * 64 * 196 * 2
    assert rank_for_ratio(shape, 1 / 16, "spatial") == 196
    assert rank_for_ratio(shape, 1 / 16, "channel") == 64 * 56 * 56 // 16
    assert rank_for_ratio((1, 1, 2, 2), 1e-6, "spatial") == 1


def test_clear_errors():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        sketch_shape((2, 3, 4, 4), 0, "spatial")
    with pytest.raises(ValueError, match="unknown mode"):
        sketch_shape((2, 3, 4, 4), 2, "pixel")
    with pytest.raises(ValueError, match="unknown probe"):
        probe_buckets_and_values(0, torch.arange(3), 2, "sobol")
    with pytest.raises(ValueError, match="ratio"):
        rank_for_ratio((2, 3, 4, 4), 0.0, "spatial")
    with pytest.raises(ValueError, match="below 2\\*\\*32"):
        probe_buckets_and_values(0, torch.tensor([2**33]), 2, "rademacher")
