#!/usr/bin/env python
"""Check the stated upstream level: the error quantizing a BatchNorm's input puts into the dW of
the conv before it, against that conv's SGD noise (per-sample gradients, whole-batch dY)."""
import math, torch
from torch import nn
from fxsketch.ops import quant as q
from fxsketch.quant_noise import norm_noise_terms
torch.manual_seed(0)
B = 16
conv1, bn1, conv2, bn2 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
head = nn.Linear(16 * 16 * 16, 10)
x, target = torch.randn(B, 3, 16, 16), torch.randint(0, 10, (B,))
def run(bits=None):
    a = torch.relu(bn1(conv1(x)))
    z = conv2(a); z.retain_grad()
    y = bn2(z) if bits is None else q.quant_norm_module(z, bn2, bits=bits)
    loss = nn.functional.cross_entropy(head(torch.relu(y).flatten(1)), target, reduction="sum")
    gw, = torch.autograd.grad(loss, [conv2.weight], retain_graph=True)
    dy_bn = torch.autograd.grad(loss, [y], retain_graph=True)[0]
    dz = torch.autograd.grad(loss, [z])[0]
    return gw, a.detach(), z.detach(), dy_bn, dz
gw, a, z, dybn, dz = run()
per = torch.stack([torch.nn.grad.conv2d_weight(a[n:n+1], conv2.weight.shape, dz[n:n+1], padding=1) for n in range(B)])
flat = per.flatten(1)
sgd = math.sqrt(B * float(((flat - flat.mean(0)) ** 2).sum(1).sum() / (B - 1)))
terms = norm_noise_terms(z, dybn, "batch", weight=bn2.weight)
for bits in (8, 4):
    errs = [float((run(bits)[0] - gw).pow(2).sum()) for _ in range(50)]
    print(f"{bits}-bit: conv2 dW error / its SGD noise = {math.sqrt(sum(errs)/len(errs))/sgd:.4f};"
          f" stated upstream {terms.dx_ratio(bits):.4f}, weight {terms.weight_ratio(bits):.4f}, level {terms.ratio(bits):.4f}")
