"""MemoryPlan (fxsketch/plan.py): the data, its renderers, meta inputs, planning cost; and the CLI."""
from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.__main__ import build_parser, main, parse_shape
from fxsketch.report import MemoryPlan

tv = pytest.importorskip("torchvision")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.relu(self.bn(self.conv(x)))
        return self.fc(h.mean((2, 3)))


@pytest.fixture(scope="module")
def small_plan() -> MemoryPlan:
    torch.manual_seed(0)
    return fxsketch.plan(Small(), (torch.randn(8, 3, 16, 16),))


def test_unmodified_model_has_baseline_equal_to_peak(small_plan):
    assert small_plan.baseline_peak_bytes == small_plan.peak_bytes > 0
    assert small_plan.decisions == ()
    assert small_plan.peak_bytes == max(small_plan.timeline.live_bytes)
    assert sum(small_plan.breakdown.values()) == small_plan.peak_bytes


def test_to_dict_is_plain_json(small_plan):
    d = json.loads(json.dumps(small_plan.to_dict()))  # no default=: every value is JSON already
    assert d["peak_bytes"] == d["baseline_peak_bytes"] == small_plan.peak_bytes
    assert d["peak_node"] == small_plan.peak_node
    assert [r["name"] for r in d["rows"]] == [r.name for r in small_plan.rows]
    assert json.loads(small_plan.to_json())["model"] == "Small"


def test_to_json_writes_the_file(small_plan, tmp_path):
    path = tmp_path / "plan.json"
    text = small_plan.to_json(path)
    assert json.loads(path.read_text()) == json.loads(text)


def test_str_has_summary_and_every_node(small_plan):
    text = str(small_plan)
    for label in ("fxsketch memory plan for Small", "parameters", "inputs", "predicted peak",
                  "at the peak:", "saved", "largest alive:"):
        assert label in text, label
    assert "unmodified peak" not in text  # only shown once the plan changes something
    table = text.split("\n\n", 1)[1].splitlines()
    assert table[0].split()[:2] == ["node", "op"]
    names = [line.split()[0] for line in table[2:]]
    assert names == ["x", "conv", "bn", "relu", "mean", "fc"]
    assert len(small_plan.rows) == len(names)


@pytest.mark.parametrize("suffix", [".png", ".svg", ".html"])
def test_save_draws_the_timeline(small_plan, tmp_path, suffix):
    pytest.importorskip("matplotlib")
    path = small_plan.save(tmp_path / f"plan{suffix}")
    assert path.exists() and path.stat().st_size > 1000
    if suffix == ".html":
        assert "predicted peak" in path.read_text()


def test_save_refuses_an_unknown_format(small_plan, tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match=r"cannot save a plan as \.txt: use \.png, \.svg"):
        small_plan.save(tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()


def test_meta_input_gives_the_same_plan_as_a_real_one():
    model = tv.models.resnet18()
    real = fxsketch.plan(model, (torch.randn(2, 3, 64, 64),))
    meta = fxsketch.plan(model, (torch.empty(2, 3, 64, 64, device="meta"),))
    assert meta.peak_bytes == real.peak_bytes
    assert meta.timeline.live_bytes == real.timeline.live_bytes
    assert meta.input_bytes == real.input_bytes == 2 * 3 * 64 * 64 * 4


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_resnet50_batch_256_plans_fast_without_allocating():
    model = tv.models.resnet50()
    x = torch.empty(256, 3, 224, 224, device="meta")
    fxsketch.plan(model, (x,))  # warm-up: imports, fake-tensor caches
    rss = _rss_bytes()
    start = time.perf_counter()
    p = fxsketch.plan(model, (x,))
    seconds = time.perf_counter() - start
    grew = _rss_bytes() - rss
    saved = p.breakdown["saved"]
    assert saved > 16 * 2**30            # ~20 GiB of activations planned ...
    assert grew < 2**30, grew             # ... none of them allocated
    assert seconds < 2.0, seconds


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_plan_prints_the_report_and_writes_json(capsys, tmp_path):
    out_json = tmp_path / "plan.json"
    assert main(["plan", "torchvision.models:resnet18", "--input", "2x3x32x32",
                 "--json", str(out_json), "--nodes"]) == 0
    text = capsys.readouterr().out
    assert "fxsketch memory plan for ResNet" in text and "predicted peak" in text
    assert "layer4_1_conv2" in text  # the node table
    d = json.loads(out_json.read_text())
    assert d["model"] == "ResNet" and d["peak_bytes"] > 0


def test_cli_measure_prints_predicted_and_measured(capsys):
    assert main(["plan", "fxsketch.__main__:SmallCNN", "--input", "2x3x16x16", "--measure"]) == 0
    text = capsys.readouterr().out
    assert "predicted peak" in text and "measured" in text


def test_cli_meta_and_several_inputs(capsys):
    assert main(["plan", "torchvision.models:resnet18", "--input", "64x3x224x224", "--meta"]) == 0
    assert "GiB" in capsys.readouterr().out
    args = build_parser().parse_args(["plan", "m:f", "--input", "2x3", "--input", "4", "--dtype", "float64"])
    assert args.input == [(2, 3), (4,)] and args.dtype is torch.float64
    assert args.func.__name__ == "cmd_plan"


@pytest.mark.parametrize("argv, message", [
    (["plan", "torchvision.models"], "not MODULE:CALLABLE"),
    (["plan", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["plan", "torchvision.models:nope"], "has no 'nope'"),
])
def test_cli_bad_model_spec_says_what_to_write(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_cli_bad_shape_and_dtype_are_usage_errors(capsys):
    for argv in (["plan", "m:f", "--input", "2xq"], ["plan", "m:f", "--dtype", "float33"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "unknown dtype 'float33'" in capsys.readouterr().err
    assert parse_shape("8X3x224x224") == (8, 3, 224, 224)


def test_cli_prints_the_node_table_only_with_nodes(capsys):
    assert main(["plan", "fxsketch.__main__:SmallCNN", "--input", "2x3x16x16", "--optimize"]) == 0
    text = capsys.readouterr().out
    assert "predicted peak" in text and "placeholder" not in text


@pytest.mark.parametrize("flag, path, message", [
    ("--plot", "plan.txt", r"cannot save a plan as \.txt"),
    ("--json", "no_such_folder_xyz/plan.json", "does not exist"),
])
def test_cli_checks_outputs_before_planning(tmp_path, flag, path, message):
    start = time.perf_counter()
    with pytest.raises(SystemExit, match=message):
        main(["plan", "torchvision.models:resnet50", "--input", "64x3x224x224", "--budget", "0.5",
              flag, str(tmp_path / path)])
    assert time.perf_counter() - start < 2.0  # refused before the model was even built


def test_plot_draws_both_timelines_in_their_own_panels(tmp_path):
    pytest.importorskip("matplotlib")
    from fxsketch._plot import _figure
    torch.manual_seed(0)
    gm = fxsketch.optimize(Small(), (torch.randn(8, 3, 16, 16),), max_overhead=1.0, calibrate=False)
    fig, plt = _figure(gm.memory_plan)
    titles = [ax.get_title() for ax in fig.axes]
    plt.close(fig)
    assert len(titles) == 2 and "unmodified" in titles[0] and "optimized" in titles[1]
