"""Quiet by default, informative on request: library calls print nothing; the "fxsketch" logger tells."""
import json
import logging
import os
import subprocess
import sys

import torch
from torch import nn

import fxsketch
from fxsketch.units import format_bytes

NET = """nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                       nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                       nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                       nn.Linear(16, 10))"""


def small_net():
    return eval(NET)


def test_library_calls_write_nothing_when_not_on_a_terminal(tmp_path):
    # a fresh interpreter at default settings (warning filters, logging, progress=None), stdin,
    # stdout and stderr pipes: what a script, a notebook kernel's subprocess or CI sees
    out = tmp_path / "result.json"
    code = f"""
import json, torch, fxsketch
from torch import nn
torch.manual_seed(0)
model, x = {NET}, torch.randn(8, 3, 32, 32)
gm = fxsketch.optimize(model, (x,))
p = fxsketch.plan(model, (x,))
m = fxsketch.measure(model, (x,))
json.dump({{"decisions": len(gm.memory_plan.decisions), "notes": gm.memory_plan.notes}}, open({str(out)!r}, "w"))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TQDM_DISABLE")}
    done = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    result = json.loads(out.read_text())
    assert result["decisions"] > 0  # the whole pipeline ran, calibration (and its bar's code) included
    assert any("calibrated" in n for n in result["notes"])


def test_the_package_logger_has_only_a_null_handler():
    handlers = logging.getLogger("fxsketch").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
    assert not any(type(h) is logging.StreamHandler for h in handlers)


def test_the_logger_tells_the_summary_notes_and_decisions(caplog):
    torch.manual_seed(0)
    model, x = small_net(), torch.randn(8, 3, 32, 32)
    with caplog.at_level(logging.DEBUG, logger="fxsketch"):
        gm = fxsketch.optimize(model, (x,), workspace="off", progress=False, seed=0)
        p = fxsketch.plan(model, (x[:2],))
        fxsketch.measure(model, (x,), repeat=1)
    plan = gm.memory_plan
    api = [r for r in caplog.records if r.name == "fxsketch.api"]
    info = [r.getMessage() for r in api if r.levelno == logging.INFO]
    assert info[0].startswith(f"optimize Sequential: predicted peak {format_bytes(plan.peak_bytes)}")
    assert f"{len(plan.decisions)} decisions" in info[0]
    assert [f"note: {n}" for n in plan.notes] == info[1:1 + len(plan.notes)]
    assert f"plan Sequential: predicted peak {format_bytes(p.peak_bytes)} at {p.peak_node}" in info
    decisions = [r.getMessage() for r in api if r.levelno == logging.DEBUG]
    assert len(decisions) == len(plan.decisions) > 0
    assert all(m.startswith(f"decision: {d.node} -> {d.option.value}") for m, d in zip(decisions, plan.decisions))
    names = {r.name for r in caplog.records}
    assert {"fxsketch.pipeline", "fxsketch.measurement"} <= names
    assert all(r.name.startswith("fxsketch") for r in caplog.records if r.levelno >= logging.INFO)


def test_nothing_is_logged_at_info_by_default(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        fxsketch.plan(small_net(), (torch.randn(2, 3, 16, 16),))
    assert not [r for r in caplog.records if r.name.startswith("fxsketch")]


def test_progress_true_shows_the_calibration_bar(capsys):
    torch.manual_seed(0)
    fxsketch.optimize(small_net(), (torch.randn(8, 3, 32, 32),), workspace="off", progress=True, seed=0)
    assert "calibrating convs" in capsys.readouterr().err
