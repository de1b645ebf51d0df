"""Are the planner's prices right? One ResNet-50 16x3x224x224 plan priced by node times (the
default) and one priced by the roofline (``time_nodes=False``), each optimized with
``budget=None, max_overhead=0.15, seed=0``, then eager and optimized training steps timed
alternately (best of 3 after one warm-up each): estimated against measured step overhead.

    .venv/bin/python tools/check_prices.py        # docs/replays.md, "Measured on CPU"
"""
import time, torch, torchvision, fxsketch
torch.manual_seed(0)
model = torchvision.models.resnet50()
x = torch.randn(16, 3, 224, 224)
def step(m):
    t = time.perf_counter(); m(x).sum().backward(); dt = time.perf_counter() - t
    for p in m.parameters(): p.grad = None
    return dt
for label, opts in (("node times", {}), ("roofline", dict(time_nodes=False))):
    gm = fxsketch.optimize(model, (x,), None, max_overhead=0.15, seed=0, progress=False, **opts)
    p = gm.memory_plan
    step(model); step(gm)
    e, o = [], []
    for _ in range(3):
        e.append(step(model)); o.append(step(gm))
    kinds = {}
    for d in p.decisions: kinds[d.option.value] = kinds.get(d.option.value, 0) + 1
    print(f"{label}: predicted {p.peak_bytes/2**20:.0f} MiB ({p.baseline_peak_bytes/p.peak_bytes:.2f}x), est {100*p.extra_time:.1f} %, "
          f"measured {100*(min(o)/min(e)-1):+.1f} % (eager {min(e):.2f} s, optimized {min(o):.2f} s), {kinds}", flush=True)
