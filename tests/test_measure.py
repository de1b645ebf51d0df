"""measure(): exact peaks on hand-countable cases, default_loss, and that the user's model is left alone."""
from __future__ import annotations

import pytest
import torch

from fxsketch.measurement import LiveStorageTracker, Measurement, default_loss, measure

F32 = 4  # bytes per float32 element


# --------------------------------------------------------------------------------------------
# LiveStorageTracker: counts written out by hand


def test_chain_of_two_muls_is_exact():
    x = torch.randn(1000)  # 4000 B, resident
    with LiveStorageTracker([x], record=True) as tr:
        z = (x * 2) * 3  # x*2 is still referenced while the second mul returns: x, y, z coexist
    assert tr.resident_bytes == 4000
    assert tr.peak_bytes == 12000
    assert tr.timeline == [("aten::mul.Tensor", 8000), ("aten::mul.Tensor", 12000)]
    del z


def test_views_and_inplace_share_one_storage():
    x = torch.randn(1000)
    with LiveStorageTracker([x]) as tr:
        y = x * 2
        v = y.view(10, 100).t()  # views: same storage
        y.add_(1)                # in-place: same storage
        w = x.view(100, 10)      # view of a resident storage: already counted
    assert tr.peak_bytes == 8000
    del y, v, w


def test_freed_storages_stop_counting():
    x = torch.randn(1000)
    with LiveStorageTracker([x], record=True) as tr:
        a = x * 2
        del a  # freed before b is allocated
        b = x * 3
        del b
    assert tr.peak_bytes == 8000
    assert tr.live_bytes == 4000


def test_tuple_and_none_outputs():
    x = torch.randn(10, 100)  # 4000 B
    a = torch.zeros(5)
    with LiveStorageTracker([x, a]) as tr:
        values, indices = torch.max(x, dim=1)  # 10 float32 + 10 int64
        torch._foreach_add_([a], 1.0)          # in-place foreach op returns None
    assert tr.resident_bytes == 4000 + 5 * F32
    assert tr.peak_bytes == tr.resident_bytes + 10 * 4 + 10 * 8
    del values, indices


def test_meta_and_empty_tensors_are_ignored():
    with LiveStorageTracker() as tr:
        m = torch.empty(1 << 20, device="meta") * 2
        e = torch.empty(0) + 1
    assert tr.peak_bytes == 0
    del m, e


def test_resident_storage_counted_once():
    w = torch.randn(10, 10)
    tr = LiveStorageTracker([w, w.t(), w[0]])
    assert tr.resident_bytes == 100 * F32


def test_conv_backward_is_seen_and_includes_weight_grad():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3)
    x = torch.randn(1, 2, 5, 5)
    resident = (3 * 2 * 3 * 3 + 3 + 1 * 2 * 5 * 5) * F32  # weight + bias + input
    with LiveStorageTracker([*conv.parameters(), x], record=True) as tr:
        out = conv(x)
        loss = out.sum()
        loss.backward()
    assert tr.resident_bytes == resident
    assert "aten::convolution_backward" in [name for name, _ in tr.timeline]
    # Right after convolution_backward: resident + out (27 floats) + loss + its ones-gradient
    # + grad_weight + grad_bias; no grad_input (x does not require grad).
    grads = (conv.weight.numel() + conv.bias.numel()) * F32
    assert tr.peak_bytes == resident + 27 * F32 + F32 + F32 + grads
    del out, loss


# --------------------------------------------------------------------------------------------
# measure()


def test_linear_step_is_exact():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    m = measure(lin, x)
    resident = (12 + 3 + 8) * F32  # weight, bias, input
    # forward: addmm output (2x3) and the loss scalar; backward: the ones seed for loss (its
    # expand is a view), grad_weight = mm (4x3, then .t() views) and grad_bias = sum (3), both
    # kept as .grad. Linear saves x and weight, which are resident: nothing more.
    expected = resident + 6 * F32 + F32 + F32 + 12 * F32 + 3 * F32
    assert m.resident_bytes == resident
    assert m.peak_bytes == expected == 184
    assert m.device == "cpu"
    assert m.seconds > 0


def test_peak_includes_parameter_gradients():
    lin = torch.nn.Linear(256, 256, bias=False)
    m = measure(lin, torch.randn(1, 256))
    assert m.peak_bytes - m.resident_bytes >= lin.weight.numel() * F32


def test_input_gradients_are_counted_when_inputs_require_grad():
    lin = torch.nn.Linear(64, 64, bias=False)
    x = torch.randn(8, 64)
    without = measure(lin, x).peak_bytes
    with_grad = measure(lin, x.requires_grad_()).peak_bytes
    assert with_grad - without == x.numel() * F32
    assert x.grad is None  # the caller's input is never written to


def test_model_is_not_mutated():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Dropout(0.5), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5),
    )
    model[5].eval()  # an odd mix of flags must survive as it is
    old_grad = torch.full_like(model[0].weight, 7.0)
    model[0].weight.grad = old_grad
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    buffer_ids = {k: id(v) for k, v in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    x = torch.randn(2, 3, 8, 8)
    rng = torch.get_rng_state()

    measure(model, (x,), repeat=2)

    assert model[0].weight.grad is old_grad and bool((old_grad == 7).all())
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    for k, v in model.named_buffers():
        assert id(v) == buffer_ids[k]
        torch.testing.assert_close(v, buffers[k], rtol=0, atol=0)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_works_under_callers_no_grad():
    with torch.no_grad():
        m = measure(torch.nn.Linear(4, 3), torch.randn(2, 4))
    assert m.peak_bytes == 184


def test_custom_loss_fn_and_tuple_inputs():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, a, b):
            return {"sum": self.lin(a) + b, "count": torch.tensor(3)}

    m = measure(Two(), (torch.randn(2, 4), torch.randn(2, 4)), loss_fn=lambda out: out["sum"].pow(2).mean())
    assert m.peak_bytes > m.resident_bytes > 0


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ("x", r"tuple of tensors .* got str"),
        ((torch.randn(2, 4), 3), r"example_inputs\[1\] is a int, not a tensor"),
        ({"x": torch.randn(2, 4)}, r"tuple of tensors .* got dict"),
    ],
)
def test_bad_example_inputs_say_what_to_do(bad, pattern):
    with pytest.raises(TypeError, match=pattern):
        measure(torch.nn.Linear(4, 3), bad)


def test_inputs_follow_the_same_rule_as_plan():
    # one rule for plan, optimize and measure: a tensor, or a tuple (or list) of tensors
    lin, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    assert measure(lin, [x], repeat=1).peak_bytes == measure(lin, (x,), repeat=1).peak_bytes


def test_bad_loss_and_repeat_are_explained():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="scalar tensor, got shape"):
        measure(lin, x, loss_fn=lambda out: out)
    with pytest.raises(ValueError, match="repeat must be a positive int"):
        measure(lin, x, repeat=0)
    frozen = torch.nn.Linear(4, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        measure(frozen, x)
    assert lin.weight.grad is None  # restored even when the step raised


# --------------------------------------------------------------------------------------------
# default_loss and Measurement


def test_default_loss_sums_every_floating_tensor_in_nested_output():
    out = {"a": torch.ones(2), "b": (torch.ones(3, dtype=torch.float64), [torch.arange(4), None]), "c": "text"}
    assert default_loss(out).item() == 5.0
    assert default_loss(torch.full((2, 2), 0.5)).item() == 2.0


def test_default_loss_without_floating_tensor_asks_for_loss_fn():
    with pytest.raises(ValueError, match="no floating-point tensor.*pass loss_fn"):
        default_loss((torch.arange(3), {"n": 1}))


def test_measurement_reads_well():
    m = Measurement(peak_bytes=3 << 20, seconds=0.0042, device="cpu", resident_bytes=1 << 20)
    assert str(m) == "peak 3.00 MiB on cpu (resident 1.00 MiB + 2.00 MiB during the step), 4.20 ms per step"
