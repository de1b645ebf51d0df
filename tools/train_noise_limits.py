"""Training evidence for the default max_grad_noise: digits, exact backprop vs several noise limits.

    .venv/bin/python tools/train_noise_limits.py --json /tmp/noise_limits.json

Data and model come from tools/train_digits.py: sklearn's digits at 32x32, batch 64, and its plain
CNN (``make_plain``) at ``--width`` channels with ``--full`` convs at 32x32 and ``--half`` at 16x16
(default 16, 6, 2: small enough that the whole run fits in about 20 minutes on 2 shared cores).
Adam (``--lr``, cosine schedule), ``--epochs`` epochs, seeds 0 .. ``--seeds``-1; every row trains
the same plan from each seed's initialisation, with the same batches as exact (train_digits.py's
protocol; probes from the private generator ``seed=0``). Rows:

- exact: the model itself (backprop);
- ``max_grad_noise=L, budget=B`` for each L of ``--limits``: one fixed budget B (``--budget``, a
  fraction of the unmodified predicted peak; 0.4 needs probes). A limit whose plans cannot reach B
  raises BudgetError, which the row records (with ``e.lowest``); it is not trained, because the
  next row is its lowest-peak plan;
- ``max_grad_noise=L, budget=None``: the lowest peak at that limit (within ``max_overhead=0.2``),
  where the limit binds: each probed conv gets the smallest sketch the limit allows.

A row whose plan is an earlier row's (the same decisions) shares that row's runs. Per row: test
accuracy (mean ± std, per seed, mean paired difference to exact), measured (``fxsketch.measure``)
and predicted peak of one step, the activation reduction, the probed convs (rank and calibrated
probe/SGD noise), and the rule: a row passes when its mean accuracy is at least exact's mean minus
exact's seed standard deviation. The default printed is the largest L such that every trained row
with a limit <= L passes. Noise during training: for seed 0 of every probed row,
``fxsketch.grad_noise`` on a fixed training batch at epochs 0, ``--noise-every``, ... and the last.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fxsketch

import _harness as H
from _harness import dec_text, mib
from train_digits import ACCURACY, BATCH, load_digits_tensors, make_plain


def settings(limits, budget):
    """(name, limit or None, optimize kwargs or None) per row, in training order."""
    rows = [("exact", None, None)]
    for lim in limits:
        rows.append((f"max_grad_noise={lim:g}, budget={budget:g}", lim, dict(budget=budget, max_grad_noise=lim)))
        rows.append((f"max_grad_noise={lim:g}, budget=None", lim, dict(budget=None, max_grad_noise=lim)))
    return rows


def probes(dec) -> list[dict]:
    """The probed convs of a plan: node, rank and calibrated noise."""
    return [dict(node=d["node"], rank=int(d["detail"].split("r=")[1].split()[0]), noise=d["grad_noise"])
            for d in dec if d["option"] == "probe"]


def probes_text(dec) -> str:
    pr = probes(dec)
    if not pr:
        return "none"
    ranks = sorted({p["rank"] for p in pr})
    noise = [p["noise"] for p in pr]
    return f"{len(pr)}: r = {'/'.join(map(str, ranks))}, noise {min(noise):.2f}-{max(noise):.2f}"


def noise_recorder(gm, batch, loss_fn, epochs: int, every: int, log: dict):
    """on_epoch callback: fxsketch.grad_noise(gm, batch) at epochs 0, every, 2 every, ... and the last,
    stored in log[epoch] as {node: (rank, planned, now)}."""
    x, y = batch
    original = {d.rewritten: d.node for d in gm.memory_plan.decisions}  # the plan's node names

    def record(epoch: int):
        if epoch % every and epoch != epochs:
            return
        rep = fxsketch.grad_noise(gm, (x,), loss_fn=lambda out: loss_fn(out, y))
        log[epoch] = {original.get(r.node, r.node): (r.rank, r.planned, r.now) for r in rep.rows}
        worst = max((r.now for r in rep.rows), default=0.0)
        print(f"  grad_noise epoch {epoch}: {len(rep.rows)} probed, largest ratio {worst:.2f}", file=sys.stderr)
    return record


def passes(results, name) -> bool:
    ex = [r[ACCURACY.final] for r in results["exact"]["runs"]]
    acc = [r[ACCURACY.final] for r in results[name]["runs"]]
    return statistics.mean(acc) >= statistics.mean(ex) - statistics.stdev(ex)


def summary_table(results, rows) -> str:
    """Per row: limit, per-seed accuracy, paired difference, pass/fail, probes."""
    ex = [r[ACCURACY.final] for r in results["exact"]["runs"]]
    lines = ["| setting | per-seed acc. % | mean diff vs exact (points) | passes | probed convs |", "|---|---|---|---|---|"]
    for name, _lim, _kw in rows:
        r = results[name]
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | |")
            continue
        acc = [x[ACCURACY.final] for x in r["runs"]]
        diff = statistics.mean(a - e for a, e in zip(acc, ex))
        same = f" (plan of {r['same_as']})" if r.get("same_as") else ""
        lines.append(f"| {name}{same} | {' / '.join(f'{a:.2f}' for a in acc)} | {diff:+.2f} | "
                     f"{'yes' if passes(results, name) else 'no'} | {probes_text(r['runs'][0]['decisions'])} |")
    return "\n".join(lines)


def noise_table(results) -> str:
    """Per probed row and conv: rank, planned ratio, then grad_noise's ratio at each recorded epoch."""
    logs = {n: r["noise"] for n, r in results.items() if r.get("noise")}
    epochs = sorted({int(e) for log in logs.values() for e in log})
    lines = ["| setting | conv | r | planned | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
             "|---|---|---|---|" + "---|" * len(epochs)]
    for name, log in logs.items():
        for node in log[min(log)]:
            rank, planned = log[min(log)][node][:2]
            cells = [f"{log[e][node][2]:.2f}" if e in log and node in log[e] else "" for e in epochs]
            lines.append(f"| {name} | {node} | {rank} | {planned:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_limit(results, rows):
    """The largest limit L such that every trained row with a limit <= L passes (None if the smallest fails)."""
    best = None
    for lim in sorted({lim for _, lim, _ in rows if lim is not None}):
        trained = [n for n, l2, _ in rows if l2 == lim and "runs" in results[n]]
        if not all(passes(results, n) for n in trained):
            break
        best = lim
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    H.add_training_args(ap, epochs=4, seeds=3, lr=3e-3)
    ap.add_argument("--limits", default="1,2,4,8", help="comma-separated max_grad_noise values")
    ap.add_argument("--budget", type=float, default=0.4, help="the fixed budget, fraction of the unmodified peak")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--full", type=int, default=6, help="convs at 32x32")
    ap.add_argument("--half", type=int, default=2, help="convs at 16x16")
    ap.add_argument("--noise-every", type=int, default=2, help="grad_noise every this many epochs (and the last)")
    ap.add_argument("--threads", type=int, default=1)
    H.add_output_args(ap, json_help="write raw results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    make_model = lambda: make_plain(args.width, args.full, args.half)  # noqa: E731
    limits = [float(v) for v in args.limits.split(",")]
    rows = settings(limits, args.budget)
    data = xtr, ytr, _, _ = load_digits_tensors()
    steps = len(xtr) // BATCH
    example, example_y = (xtr[:BATCH].clone(),), ytr[:BATCH].clone()
    results, by_plan = {}, {}
    t_all = time.time()
    for name, _lim, setting in rows:
        model = H.seeded_model(make_model, 0)
        cur_y = {"y": example_y}
        loss_fn = lambda out: F.cross_entropy(out, cur_y["y"])  # noqa: E731
        t0 = time.time()
        gm, err = H.build(model, example, loss_fn, None if setting is None else dict(setting, progress=False, seed=0))
        if err is not None:
            low = getattr(err, "lowest", None)
            results[name] = dict(error=(f"BudgetError (lowest reachable predicted peak e.lowest = {mib(low)} MiB)"
                                        if isinstance(err, fxsketch.BudgetError) and low else H.error_text(err)))
            print(f"{name}: {results[name]['error']}", file=sys.stderr)
            continue
        head = dict(H.measure_step(gm, model, example, loss_fn), decisions=H.decisions(gm),
                    plan_seconds=time.time() - t0)
        print(f"{name}: measured {mib(head['measured_peak'])} MiB, predicted {mib(head['predicted_peak'])} MiB, "
              f"probes {probes_text(head['decisions'])}; {dec_text(head['decisions'])}", file=sys.stderr)
        key = dec_text(head["decisions"], empty="exact") if setting is not None else "backprop"
        if key in by_plan:
            results[name] = dict(runs=results[by_plan[key]]["runs"], same_as=by_plan[key])
            print(f"{name}: the plan of {by_plan[key]}, not trained again", file=sys.stderr)
            continue
        by_plan[key] = name
        runs, log = [], {}
        for seed in range(args.seeds):
            model.load_state_dict(H.seeded_model(make_model, seed).state_dict())  # gm shares model's tensors
            opt = torch.optim.Adam(model.parameters(), lr=args.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * steps)
            watch = None
            if seed == 0 and probes(head["decisions"]):
                watch = noise_recorder(gm, (example[0], example_y), F.cross_entropy, args.epochs,
                                       args.noise_every, log)
            rec = dict(seed=seed, **H.train(name, seed, gm, model, opt, data, F.cross_entropy, ACCURACY,
                                            epochs=args.epochs, batch=BATCH, sched=sched, target=cur_y,
                                            on_epoch=watch))
            if seed == 0:
                rec.update(head)
            runs.append(rec)
        results[name] = dict(runs=runs, noise=log)
        print(f"  {time.time() - t_all:.0f} s so far", file=sys.stderr)
    print(f"total {time.time() - t_all:.0f} s", file=sys.stderr)
    columns = [("probed convs", lambda s0: probes_text(s0["decisions"]))]
    H.report(results, args, ACCURACY, columns, "noise_limits_curves.png", "digits, max_grad_noise")
    print()
    print(summary_table(results, rows))
    print()
    print(noise_table(results))
    best = default_limit(results, rows)
    print(f"\ndefault by the rule (largest limit whose rows, and every smaller limit's, pass): "
          f"{'none' if best is None else f'{best:g}'}")
    return results


if __name__ == "__main__":
    main()
