"""Candidates on the liveness model: the numeric problem reproduces the schedule, and each option
releases what it should."""
import torch
from torch import nn

from fxsketch.passes.candidates import build_problem
from fxsketch.passes.options.lean import lean_spec
from fxsketch.passes.options.probe import conv_spec
from fxsketch.pipeline import analyse
from fxsketch.passes.liveness import simulate
from fxsketch.passes.solve import evaluate


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.pool(self.relu(self.bn(self.conv1(x))))).sum((2, 3))


def problem(**kw):
    torch.manual_seed(0)
    model = Block()
    a = analyse(model, (torch.randn(4, 3, 16, 16),))
    gm, schedule, tl = a.gm, a.schedule, simulate(a.schedule)
    built = build_problem(gm, schedule, tl, **kw)
    prob, cands = built.problem, built.candidates
    return gm, schedule, tl, prob, cands


def test_no_choice_reproduces_the_simulated_timeline():
    _, _, tl, prob, _ = problem()
    assert evaluate(prob, []) == list(tl.live_bytes)


def test_each_kind_of_option_is_offered_where_it_applies():
    gm, _, _, prob, cands = problem()
    kinds = {(c.kind, c.nodes[0]) for c in cands}
    assert ("probe", "conv2") in kinds          # conv1's input is the model input: kept anyway
    assert ("probe", "conv1") not in kinds
    assert ("lean", "relu") in kinds and ("lean", "pool") in kinds
    assert any(c.kind == "recompute" for c in cands)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert conv_spec(gm, nodes["conv2"])["padding"] == (1, 1)
    assert lean_spec(gm, nodes["pool"])["op"] == "max_pool"


def test_probe_releases_the_conv_input_and_adds_the_sketch():
    _, schedule, _, prob, cands = problem(methods=("probe",), probe_rank=4)
    (i,) = [k for k, c in enumerate(cands) if c.nodes == ("conv2",)]
    choice = prob.choices[i]
    saved = {s for s, key in choice.drops}
    assert [key for _, key in choice.drops] == ["conv2"]
    assert len(saved) == 1 and choice.adds[0].nbytes == 4 * 8 * 4 * 4  # N x C x r floats
    assert max(evaluate(prob, [i])) <= max(evaluate(prob, []))


def test_a_storage_saved_twice_is_freed_only_by_both_options():
    # pool's output is saved by conv2 (its input) only; relu's output by relu and by pool
    _, _, _, prob, cands = problem(methods=("lean",))
    relu = next(k for k, c in enumerate(cands) if c.nodes == ("relu",))
    pool = next(k for k, c in enumerate(cands) if c.nodes == ("pool",))
    both, only_relu, none = (max(evaluate(prob, s)) for s in ([relu, pool], [relu], []))
    assert both < only_relu <= none


def test_time_nodes_measures_every_compute_node_and_leaves_bn_stats_alone():
    import torchvision
    from fxsketch.passes.cost import time_nodes
    from fxsketch.passes.trace import trace

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    gm = trace(model, (x,), leaf_modules=())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    times = time_nodes(gm, (x,))
    compute = [n.name for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    assert set(compute) <= set(times) and all(times[n] >= 0 for n in compute)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class Residual(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c3 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return self.c3(torch.relu(y + x)).sum((2, 3))


def test_recompute_choices_predict_the_rewritten_graph():
    # the solver's view of each recompute option against the analysis of the rewritten graph;
    # a segment that starts from an activation no backward node saves (the add's inputs) must
    # hold it until the replay (it was once missed: up to 13 % under here, 45 % on ResNet-50)
    from fxsketch.measurement import default_loss
    from fxsketch.passes.rewrite import rewrite
    from fxsketch.pipeline import verify
    torch.manual_seed(0)
    model, x = Residual(), torch.randn(4, 3, 16, 16)
    a = analyse(model, (x,))
    gm, schedule = a.gm, a.schedule
    built = build_problem(gm, schedule, simulate(schedule), methods=("recompute",))
    prob, cands = built.problem, built.candidates
    ratios = {}
    for i, c in enumerate(cands):
        real = verify(rewrite(model, gm, [c]), (x,), default_loss)[1].peak_bytes
        ratios[(c.nodes[0], c.nodes[-1])] = max(evaluate(prob, [i])) / real
    assert len(ratios) > 20
    assert min(ratios.values()) >= 0.88, ratios  # the solver may overestimate (a safe error)
    assert max(ratios.values()) <= 1.2, ratios
    assert ratios[("relu", "add")] >= 0.95 and ratios[("relu", "c2")] >= 0.95
