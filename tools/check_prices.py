"""Are the planner's prices right? One ResNet-50 16x3x224x224 plan priced by node times (the
default) and one priced by the roofline (``time_nodes=False``), each optimized with
``budget=None, max_overhead=0.15, seed=0``, then eager and optimized training steps timed in
alternating pairs (one warm-up each, then ``--rounds`` pairs): estimated against measured step
overhead. On a shared 2-core machine one step's time varies by 20 % from run to run, so the
overhead is read three ways: the median of the pairs' ratios (each pair ran back to back), the
ratio of the two best steps, and the quartiles of the pairs' ratios (how far to trust it). The
estimate (``memory_plan.overhead``) is against the step as given, the layout's measured change
(channels_last convs on CPU, ``memory_format="auto"``) included; each pair also times an eager
channels_last copy of the model (weights and input channels_last), and the overhead is read
against it too.

    .venv/bin/python tools/check_prices.py              # docs/replays.md, "Measured on CPU"
    .venv/bin/python tools/check_prices.py --rounds 12
"""
import argparse
import copy
import statistics
import time

import torch
import torchvision

import fxsketch


def step(m, x):
    t = time.perf_counter()
    m(x).sum().backward()
    dt = time.perf_counter() - t
    for p in m.parameters():
        p.grad = None
    return dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8, help="alternating (eager, optimized) step pairs per plan")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    x = torch.randn(16, 3, 224, 224)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for label, opts in (("node times", {}), ("roofline", dict(time_nodes=False))):
        gm = fxsketch.optimize(model, (x,), None, max_overhead=0.15, seed=0, progress=False, **opts)
        p = gm.memory_plan
        step(model, x), step(cl, x_cl), step(gm, x)
        e, c, o = [], [], []
        for _ in range(args.rounds):
            e.append(step(model, x))
            c.append(step(cl, x_cl))
            o.append(step(gm, x))
        kinds = {}
        for d in p.decisions:
            kinds[d.option.value] = kinds.get(d.option.value, 0) + 1
        print(f"{label}: predicted {p.peak_bytes / 2**20:.0f} MiB ({p.baseline_peak_bytes / p.peak_bytes:.2f}x), "
              f"est {100 * p.overhead:+.1f} % against the step as given (options {100 * p.extra_time:.1f} % over the "
              f"relaid-out step, layout {100 * p.layout_time:+.1f} %), {kinds}", flush=True)
        for ref, times in (("eager as given", e), ("eager channels_last", c)):
            ratios = sorted(b / a - 1 for a, b in zip(times, o))
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            print(f"  against {ref}: median of {args.rounds} pairs {100 * statistics.median(ratios):+.1f} % "
                  f"(quartiles {100 * q1:+.1f} / {100 * q3:+.1f} %), best steps {100 * (min(o) / min(times) - 1):+.1f} % "
                  f"({ref} {min(times):.2f} s, optimized {min(o):.2f} s)", flush=True)

if __name__ == "__main__":
    main()
