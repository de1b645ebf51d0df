"""optimize(): the rewritten module trains like the model, within the budget, and bad input is refused."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch import BudgetError
from fxsketch.passes.candidates import build_problem
from fxsketch.passes.liveness import simulate
from fxsketch.passes.rewrite import rewrite
from fxsketch.pipeline import analyse
from fxsketch.report import Option

# non-probed gradients go through the same kernels as eager (recomputation replays them), so
# they agree to float32 round-off; this is the documented tolerance
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5


class Net(nn.Module):
    """conv-bn-relu blocks with residual adds, a max-pool and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)) for _ in range(3))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(block(x) + x)
        return self.head(self.pool(x).mean((2, 3)))


def net_and_input(seed=0):
    torch.manual_seed(seed)
    return Net(), torch.randn(8, 3, 32, 32)


def budget_between(model, x, f, methods=("probe", "lean", "recompute")):
    """A budget a fraction f of the way from the lowest reachable peak up to the unmodified one."""
    lowest = fxsketch.plan(model, (x,), optimized=True, methods=methods, max_overhead=10.0, calibrate=False)
    return int(lowest.peak_bytes + f * (lowest.baseline_peak_bytes - lowest.peak_bytes))


def grads(module, x, loss_fn=lambda o: o.sum()):
    for p in module.parameters():
        p.grad = None
    loss_fn(module(x)).backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def probed_weights(gm):
    """Weights of the probed convs, those inside replayed segments too (a segment's weight is a
    placeholder: the outer call's argument names it)."""
    def probed(graph, name_of):
        return {name_of(n.args[1]) for n in graph.nodes
                if n.op == "call_function" and getattr(n.target, "__name__", "") == "probed_conv"}
    out = probed(gm.graph, lambda a: a.target)
    for call in gm.graph.nodes:
        m = gm.get_submodule(call.target) if call.op == "call_module" else None
        if hasattr(m, "segment"):
            outer = dict(zip([p for p in m.segment.graph.nodes if p.op == "placeholder"], call.args))
            out |= probed(m.segment.graph, lambda a: outer[a].target if a in outer else a.target)
    return out


@pytest.fixture(scope="module")
def optimized():
    model, x = net_and_input()
    gm = fxsketch.optimize(model, (x,), budget_between(model, x, 0.2), max_overhead=1.0, calibrate=False)
    return model, x, gm


def test_uses_every_method_and_reports_decisions(optimized):
    _, _, gm = optimized
    kinds = {d.option for d in gm.memory_plan.decisions}
    assert kinds & {Option.PROBE, Option.LEAN, Option.RECOMPUTE}
    text = str(gm.memory_plan)
    assert "decisions:" in text and "unmodified peak" in text
    code = gm.code
    for d in gm.memory_plan.decisions:
        if d.option is Option.PROBE:
            assert "probed_conv" in code
        if d.option is Option.LEAN:
            assert "lean_" in code


def test_outputs_equal_eager(optimized):
    model, x, gm = optimized
    torch.testing.assert_close(gm(x), model(x))


def test_same_parameters_and_state_dict_keys(optimized):
    model, _, gm = optimized
    assert list(gm.state_dict().keys()) == list(model.state_dict().keys())
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), gm.named_parameters()):
        assert n1 == n2 and p1 is p2  # shared, as documented


@pytest.fixture(scope="module")
def optimized_without_quant():
    # a quantized norm approximates every gradient upstream of it (tests/test_quant.py bounds
    # that error): the exact parts of a probed plan are checked on a plan without it
    model, x = net_and_input()
    methods = ("probe", "lean", "recompute")
    gm = fxsketch.optimize(model, (x,), budget_between(model, x, 0.2, methods), max_overhead=1.0,
                           calibrate=False, methods=methods, memory_format="preserve")  # bitwise-exact
    return model, x, gm


def test_non_probed_gradients_equal_eager(optimized_without_quant):
    model, x, gm = optimized_without_quant
    ref = copy.deepcopy(model)
    g_ref = grads(ref, x)
    g_opt = grads(gm, x)
    probed = probed_weights(gm)
    assert g_ref.keys() == g_opt.keys()
    for name in g_ref:
        if name not in probed:
            torch.testing.assert_close(g_opt[name], g_ref[name], rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_probed_gradients_unbiased():
    model, x = net_and_input(1)
    # every conv probed (r=16), whether or not the planner would: the rewrite itself is under test
    a = analyse(model, (x,))
    tgm, schedule = a.gm, a.schedule
    cands = build_problem(tgm, schedule, simulate(schedule), methods=("probe",), probe_rank=16).candidates
    gm = rewrite(model, tgm, cands)
    probed = probed_weights(gm)
    assert probed
    ref = copy.deepcopy(model)
    exact = grads(ref, x)
    steps = 150
    total = {n: torch.zeros_like(exact[n]) for n in probed}
    sq = {n: torch.zeros_like(exact[n]) for n in probed}
    for _ in range(steps):
        g = grads(gm, x)
        for n in probed:
            total[n] += g[n]
            sq[n] += g[n] ** 2
    for n in probed:
        mean = total[n] / steps
        stderr = ((sq[n] / steps - mean ** 2).clamp_min(0) / steps).sqrt()
        # mean of estimates within 5 standard errors of the exact gradient, almost everywhere
        inside = ((mean - exact[n]).abs() <= 5 * stderr + 1e-5).float().mean()
        assert inside > 0.99, (n, inside)


def test_sgd_training_runs_and_loss_falls():
    model, x = net_and_input(2)
    y = torch.randint(0, 10, (8,))
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    gm = fxsketch.optimize(model, (x,), 0.8, loss_fn=loss_fn, max_overhead=1.0, seed=0, calibrate=False)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(gm(x))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_model_is_not_modified():
    model, x = net_and_input(3)
    before = copy.deepcopy(model.state_dict())
    code_before = [type(m) for m in model.modules()]
    rng = torch.get_rng_state()
    fxsketch.optimize(model, (x,), 0.7, max_overhead=1.0)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(before[k], after[k], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    assert [type(m) for m in model.modules()] == code_before
    assert torch.equal(rng, torch.get_rng_state())


def test_calibrated_probes_stay_within_the_noise_limit():
    model, x = net_and_input(5)
    y = torch.randint(0, 10, (8,))
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    for limit in (0.5, 4.0):
        gm = fxsketch.optimize(model, (x,), methods=("probe",), max_overhead=10.0, loss_fn=loss_fn,
                               max_grad_noise=limit, ratios=(1 / 2, 1 / 4, 1 / 16), progress=False)
        assert any("calibrated" in n for n in gm.memory_plan.notes)
        for d in gm.memory_plan.decisions:
            assert d.option is Option.PROBE and d.grad_noise <= limit and "x SGD" in d.detail


def test_seed_makes_probes_reproducible():
    model, x = net_and_input(4)
    a = fxsketch.optimize(model, (x,), methods=("probe",), probe_rank=8, seed=7, max_overhead=10.0)
    b = fxsketch.optimize(model, (x,), methods=("probe",), probe_rank=8, seed=7, max_overhead=10.0)
    torch.manual_seed(123)
    ga = grads(a, x)
    torch.manual_seed(456)  # a private generator: the global seed does not matter
    gb = grads(b, x)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n])


def test_unreachable_budget_names_the_lowest_peak_and_it_is_reachable():
    model, x = net_and_input()
    with pytest.raises(BudgetError, match="lowest reachable predicted peak") as e:
        fxsketch.optimize(model, (x,), "1KB", calibrate=False)
    assert e.value.lowest > 1000
    # the methods that offered choices; offload (CUDA) offers none on a CPU step
    assert "'lean'" in str(e.value) and "(offload: no choice on this step)" in str(e.value)
    gm = fxsketch.optimize(model, (x,), e.value.lowest, calibrate=False)
    assert gm.memory_plan.peak_bytes <= e.value.lowest


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=1.5), "fraction"),
    (dict(budget=-3), "positive"),
    (dict(budget="lots"), "byte size"),
    (dict(budget=[1]), "budget must be"),
    (dict(methods=("magic",)), "unknown method"),
    (dict(max_overhead=-1), "max_overhead"),
    (dict(probe_rank=0), "probe_rank"),
    (dict(probe="uniform"), "unknown probe"),
    (dict(mode="diagonal"), "unknown mode"),
    (dict(solver_max_nodes=0), "solver_max_nodes"),
    (dict(solver_time_limit=2.0), "replaced by 'solver_max_nodes'"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    model, x = net_and_input()
    with pytest.raises((ValueError, TypeError), match=match):
        fxsketch.optimize(model, (x,), **kwargs)


def test_plan_accepts_the_same_arguments():
    model, x = net_and_input()
    p = fxsketch.plan(model, (x,), 0.8, optimized=True, max_overhead=1.0, calibrate=False)
    assert p.peak_bytes <= p.budget_bytes and p.decisions


def _check_budget(model, x, fracs):
    met = 0
    for f in fracs:
        budget = budget_between(model, x, f)
        try:
            # every method; probe ranks from the fixed ratios (no calibration), so probes are used
            gm = fxsketch.optimize(model, (x,), budget, max_overhead=1.0, calibrate=False)
        except BudgetError as e:
            assert e.lowest > budget
            continue
        measured = fxsketch.measure(gm, (x,), repeat=1).peak_bytes
        assert measured <= budget * 1.05, (f, measured, budget)
        assert abs(gm.memory_plan.tensor_peak_bytes / measured - 1) < 0.05
        met += 1
    assert met, "no budget could be met"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vgg11", "r3d_18", "unet3d"])
def test_measured_peak_within_budget(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    if name == "resnet18":
        model, x = torchvision.models.resnet18(), torch.randn(16, 3, 96, 96)
    elif name == "vgg11":
        model, x = torchvision.models.vgg11(), torch.randn(4, 3, 64, 64)
    elif name == "r3d_18":
        model, x = torchvision.models.video.r3d_18(), torch.randn(2, 3, 8, 48, 48)
    else:
        monai = pytest.importorskip("monai")
        model = monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2,
                                         channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=2)
        x = torch.randn(2, 1, 32, 32, 32)
    _check_budget(model, x, (0.6, 0.2))


def test_a_batch_of_one_plans_without_calibration():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(1, 3, 32, 32)
    gm = fxsketch.optimize(model, (x,), max_overhead=1.0, progress=False)
    assert any(n.startswith("uncalibrated (a batch of 1") for n in gm.memory_plan.notes), gm.memory_plan.notes


def test_deepcopy_and_pickle_keep_the_plan(optimized):
    import pickle
    _, x, gm = optimized
    for copied in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert copied.memory_plan.peak_bytes == gm.memory_plan.peak_bytes
        torch.testing.assert_close(copied(x), gm(x))


def test_probe_note_counts_calibrated_and_refused_convs():
    model, x = net_and_input()
    # in NCHW: channels_last's lower reachable peak leaves no room for a calibration batch here
    plan = fxsketch.optimize(model, (x,), max_overhead=1.0, progress=False, memory_format="preserve").memory_plan
    assert any(n.startswith("probing: ") and ("(calibrated)" in n or "calibrated probe" in n)
               for n in plan.notes), plan.notes


def test_a_mistyped_option_lists_the_valid_ones():
    model, x = net_and_input()
    with pytest.raises(fxsketch.ConfigError, match=r"'max_overheed' \(did you mean 'max_overhead'\?\).*max_grad_noise"):
        fxsketch.optimize(model, (x,), max_overheed=0.3)
    with pytest.raises(fxsketch.ConfigError, match=r"budget=1 is 1 B, below 1 KiB.*budget=1.0"):
        fxsketch.optimize(model, (x,), 1)
    with pytest.raises(fxsketch.ConfigError, match="without optimized=True"):
        fxsketch.plan(model, (x,), 0.5)


def test_budget_error_hints_only_at_options_not_already_on():
    model, x = net_and_input()
    with pytest.raises(BudgetError) as all_on:
        fxsketch.optimize(model, (x,), "2KiB", calibrate=False)
    assert "allow more methods" not in str(all_on.value)
    with pytest.raises(BudgetError) as lean_only:
        fxsketch.optimize(model, (x,), "2KiB", methods=("lean",), calibrate=False)
    assert "allow more methods (methods=('lean', 'probe', 'recompute'" in str(lean_only.value)


def test_a_library_call_without_a_terminal_prints_nothing():
    # calibration's progress bar follows tqdm's convention: shown only on a terminal
    import subprocess
    import sys
    code = ("import torch, fxsketch; from torch import nn; torch.manual_seed(0); "
            "m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)); "
            "fxsketch.optimize(m, (torch.randn(4, 3, 16, 16),), max_overhead=1.0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and run.stderr == "", (run.stdout, run.stderr)


def test_the_same_plan_in_two_processes(tmp_path):
    # the roofline's machine constants are measured once and kept on disk, so a meta-input plan
    # (roofline costs) does not change with the timing noise of a new measurement
    import os
    import subprocess
    import sys
    code = ("import torch, torchvision, fxsketch; torch.manual_seed(0); "
            "p = fxsketch.plan(torchvision.models.resnet18(), (torch.empty(8, 3, 224, 224, device='meta'),), "
            "optimized=True); print([(d.node, d.option.value, d.detail) for d in p.decisions], p.peak_bytes)")
    env = dict(os.environ, FXSKETCH_CACHE=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and "lean" in runs[0].stdout  # a plan with decisions
    assert (tmp_path / "device.json").exists()


def test_a_non_persistent_buffer_stays_out_of_the_state_dict():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("scale", torch.tensor(2.0), persistent=False)

        def forward(self, x):
            return self.lin(x) * self.scale

    model = Scaled()
    gm = fxsketch.optimize(model, (torch.randn(8, 4),), workspace="off", progress=False)
    assert gm.state_dict().keys() == model.state_dict().keys()
