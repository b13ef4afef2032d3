"""Physical (neuron-level) children across the torchvision and timm model zoos.

Every model is built with random weights (no downloads) for 10 classes, split into
children with ``pat.split(..., level="neuron", physical=True)`` on one small input, and
each child is run. A case counts as *physical* when every child runs, returns the
parent's output shape and is smaller than the parent (for a partition: the children
together hold at most the parent's parameters); as *refused* when pat says no in one
line (a ``PatError``); anything else (another exception, a timeout, the memory limit of
the subprocess) is a *failure*, which pat must never have.

    python benchmarks/zoo.py --zoo torchvision            # the whole zoo, ~8 min on 2 cores
    python benchmarks/zoo.py --zoo timm --save timm.jsonl
    python benchmarks/zoo.py --zoo torchvision --models resnext50_32x4d regnet_x_400mf

Each model runs in its own subprocess with a wall-clock timeout and an address-space
limit, so one runaway case cannot take the machine down. docs/masks.md holds the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch

# timm families: one small member each (CNNs, ViT/DeiT, hybrids, Mixer-style, mobile).
TIMM_MODELS = [
    "resnet18", "resnext26ts", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto",
    "regnetx_002", "regnety_002", "ghostnet_100", "dla34", "repvgg_a0", "cspresnet50",
    "lcnet_050", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "pit_ti_224",
    "mixer_s16_224", "resmlp_12_224", "poolformer_s12", "mobilevit_xxs", "mobilevitv2_050",
    "levit_128s", "edgenext_xx_small", "efficientformer_l1", "fastvit_t8",
    "swin_tiny_patch4_window7_224",
]  # fmt: skip


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build(zoo: str, name: str, size: int = 64) -> tuple[torch.nn.Module, torch.Tensor]:
    """A random-init ``name`` for 10 classes and an input batch it accepts."""
    if zoo == "timm":
        import timm

        try:  # transformers take the image size; CNNs do not
            model = timm.create_model(name, pretrained=False, num_classes=10, img_size=size)
        except TypeError:
            model = timm.create_model(name, pretrained=False, num_classes=10)
        return model.eval(), torch.randn(1, 3, size, size)
    import torchvision

    kwargs: dict[str, Any] = {"num_classes": 10}
    if name.startswith("vit_"):  # two patches a side: vit_b_16 at 32, vit_h_14 at 28
        kwargs["image_size"] = size = 2 * int(name.rsplit("_", 1)[1])
    elif name in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=False)
        size = max(size, 96) if name == "inception_v3" else size
    elif name.startswith("maxvit"):  # block inputs must divide by its partition size 7
        kwargs["input_size"] = (224, 224)
        size = 224
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return model.eval(), torch.randn(1, 3, size, size)


def probe(model: torch.nn.Module, x: torch.Tensor, children: int = 2) -> dict[str, Any]:
    """Split ``model`` physically into a partition of ``children`` and check each child.

    Returns ``{"status": "physical" | "refused", ...}``; raises anything else.
    """
    import pat
    from pat.errors import PatError

    n = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    try:
        kids = pat.split(
            model, children, method="partition", level="neuron", physical=True, example_inputs=x
        )
    except PatError as e:
        return {"status": "refused", "reason": str(e), "params": n}
    seconds = time.perf_counter() - t0
    sizes = [sum(p.numel() for p in k.parameters()) for k in kids]
    with torch.no_grad():
        want = model(x).shape
        for k in kids:
            got = k.eval()(x).shape
            if got != want:
                raise AssertionError(f"child output {tuple(got)}, parent {tuple(want)}")
    if not all(s < n for s in sizes) or sum(sizes) > n:
        raise AssertionError(f"children hold {sizes} parameters, the parent {n}")
    return {"status": "physical", "params": n, "children": sizes, "seconds": round(seconds, 1)}


def _one(zoo: str, name: str, size: int, children: int) -> None:
    limit = 16 << 30  # address space: a runaway case fails here, not in the kernel's OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(1)
    try:
        model, x = build(zoo, name, size)
        out = probe(model, x, children)
    except Exception as e:  # noqa: BLE001 - a failure is a result here
        first = str(e).splitlines()[0] if str(e) else ""
        out = {"status": "failure", "reason": f"{type(e).__name__}: {first}"[:300]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print("RESULT " + json.dumps({"model": name, **out, "peak_mb": peak}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", choices=["torchvision", "timm"], default="torchvision")
    ap.add_argument("--models", nargs="*", help="only these (default: the whole zoo)")
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--children", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per model")
    ap.add_argument("--save", help="append one JSON line per model to this file")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return _one(a.zoo, a.one, a.size, a.children)
    names = a.models or (torchvision_models() if a.zoo == "torchvision" else TIMM_MODELS)
    results = []
    for name in names:
        cmd = [sys.executable, __file__, "--zoo", a.zoo, "--one", name, "--size", str(a.size),
               "--children", str(a.children)]  # fmt: skip
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            r = json.loads(line[7:]) if line else {
                "model": name, "status": "failure",
                "reason": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"}  # fmt: skip
        except subprocess.TimeoutExpired:
            r = {"model": name, "status": "failure", "reason": f"timeout after {a.timeout:.0f} s"}
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(r)
        print(f"{name:32s} {r['status']:9s} {r['wall_s']:6.1f} s  {r.get('reason', '')[:110]}",
              flush=True)  # fmt: skip
        if a.save:
            with open(a.save, "a") as f:
                f.write(json.dumps(r) + "\n")
    counts = {s: sum(r["status"] == s for r in results) for s in ("physical", "refused", "failure")}
    print(f"\n{a.zoo}: physical {counts['physical']} of {len(results)} "
          f"({100 * counts['physical'] / max(len(results), 1):.0f} %), refused {counts['refused']}, "
          f"failures {counts['failure']}")  # fmt: skip


if __name__ == "__main__":
    main()
