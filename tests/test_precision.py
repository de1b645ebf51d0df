"""Mixed precision (passes/precision.py): plans of the step as it runs under torch.autocast."""
import pytest
import torch
from torch import nn

import fxsketch

BF16 = torch.bfloat16


def _net(probed_first=False):
    torch.manual_seed(0)
    if probed_first:  # a conv whose input is the largest saved activation: probing it pays on any CPU's bf16 path
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16 * 16, 10))
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16 * 16, 10))


def _within(predicted, measured, tol=0.05):
    assert abs(predicted / measured - 1) <= tol, f"predicted {predicted} B, measured {measured} B"


def test_autocast_plan_is_of_the_low_precision_step():
    model, x = _net(), torch.randn(8, 3, 32, 32)
    full = fxsketch.plan(model, (x,))
    low = fxsketch.plan(model, (x,), autocast=BF16)
    measured = fxsketch.measure(model, (x,), autocast=BF16, repeat=1).peak_bytes
    _within(low.tensor_peak_bytes, measured)
    # bf16 activations: the low-precision step is a different (smaller) step than the fp32 one
    assert low.tensor_peak_bytes < 0.85 * full.tensor_peak_bytes
    assert fxsketch.measure(model, (x,), repeat=1).peak_bytes > measured


def test_autocast_resnet_plan_within_5_percent():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = tv.models.resnet18(), torch.randn(2, 3, 64, 64)
    _within(fxsketch.plan(model, (x,), autocast=BF16).tensor_peak_bytes,
            fxsketch.measure(model, (x,), autocast=BF16, repeat=1).peak_bytes)


@pytest.mark.parametrize("methods", [("lean",), ("recompute",), ("probe", "lean")])
def test_optimized_module_under_autocast_is_predicted_and_matches(methods):
    probing = "probe" in methods
    # probing frees a conv input only where it outweighs the probed backward's temporaries
    # (a fixed size per chunk): a larger batch than the exact options need
    model, x = _net(probing), torch.randn(128 if probing else 8, 3, 32, 32)
    extra = dict(probe_rank=8, max_grad_noise=1e9) if probing else {}
    if methods == ("recompute",):  # replays in batch chunks sum dW in another bf16 order: test_chunked_replay
        extra["chunked_replays"] = False
    gm = fxsketch.optimize(model, (x,), autocast=BF16, methods=methods, max_overhead=10.0, workspace="off",
                           progress=False, seed=0, memory_format="preserve", **extra)  # eager's bf16 rounding
    plan = gm.memory_plan
    assert {d.option.value for d in plan.decisions} == set(methods), plan.decisions
    measured = fxsketch.measure(gm, (x,), autocast=BF16, repeat=1).peak_bytes
    _within(plan.tensor_peak_bytes, measured)
    with torch.autocast("cpu", dtype=BF16):
        want, got = model(x), gm(x)
    torch.testing.assert_close(got, want)
    if not probing:  # exact options: the same bf16 gradients as the eager step
        with torch.autocast("cpu", dtype=BF16):
            model(x).float().sum().backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        with torch.autocast("cpu", dtype=BF16):
            gm(x).float().sum().backward()
        for n, p in gm.named_parameters():
            torch.testing.assert_close(p.grad, expected[n])
            assert p.grad.dtype == torch.float32  # master gradients stay fp32
        model.zero_grad()


def test_autocast_must_be_a_low_float_dtype():
    with pytest.raises(fxsketch.ConfigError, match="autocast must be None, torch.bfloat16 or torch.float16"):
        fxsketch.Config(autocast=torch.int8)
