"""Prune a torchvision model into physical children: thinner networks, same outputs' shape.

    python examples/prune_torchvision.py [--model resnet18] [--children 4]
"""

import argparse
import time

import torch

import pat

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="resnet18", help="any torchvision classification model")
ap.add_argument("--children", type=int, default=4)
args = ap.parse_args()

parent = pat.create_model(f"tv:{args.model}", num_classes=10).eval()  # random weights, no download
x = torch.randn(8, 3, 64, 64)
# a partition: every kept channel belongs to exactly one child
children = pat.split(parent, args.children, method="partition", level="neuron", physical=True,
                     example_inputs=x[:1])


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def ms(m: torch.nn.Module) -> float:
    with torch.no_grad():
        m.eval()(x)
        t = time.perf_counter()
        m(x)
        return 1e3 * (time.perf_counter() - t)


print(f"parent  {params(parent):>10,} parameters  {ms(parent):6.1f} ms / batch of 8")
for i, child in enumerate(children):
    assert child.eval()(x).shape == parent(x).shape
    print(f"child {i} {params(child):>10,} parameters  {ms(child):6.1f} ms")
