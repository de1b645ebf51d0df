"""CPU figures of docs/offload.md: device bytes predicted vs measured (exact live-storage tracker),
host bytes apart, step time; the conv net of tests/test_offload.py.

    python tools/bench_offload.py
"""
import torch
from torch import nn

import fxsketch

NAMED = ("_1", "_2", "_3", "_4", "_5", "_7")  # bn, relu, conv, tanh, conv, max-pool


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 4, 3, padding=1), nn.Sigmoid())


def main() -> None:
    for batch in (4, 16):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        model = net()
        base_plan, base = fxsketch.plan(model, (x,)), fxsketch.measure(model, (x,), repeat=5)
        gm = fxsketch.optimize(model, (x,), methods=("offload",), offload_nodes=NAMED,
                               time_nodes=False, calibrate=False, workspace="off")
        p, m = gm.memory_plan, fxsketch.measure(gm, (x,), repeat=5)
        print(f"batch {batch:2d}  unmodified: predicted {base_plan.tensor_peak_bytes} B, measured {base.peak_bytes} B, "
              f"{base.seconds * 1e3:.1f} ms | offload: predicted {p.tensor_peak_bytes} B, measured {m.peak_bytes} B; "
              f"host predicted {p.host_peak_bytes} B, measured {m.host_peak_bytes} B; {m.seconds * 1e3:.1f} ms "
              f"(estimated +{100 * p.extra_time:.0f} %)")


if __name__ == "__main__":
    main()
