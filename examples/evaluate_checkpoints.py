"""Evaluate any list of checkpoints as one ensemble: members, mean softmax, diversity.

    python examples/evaluate_checkpoints.py a.pt b.pt c.pt [--dataset digits]

Without checkpoints it trains three small models on digits first, so it runs as it is.
"""

import argparse
import tempfile
from pathlib import Path

import pat

ap = argparse.ArgumentParser()
ap.add_argument("checkpoints", nargs="*", help="pat checkpoints (pat train --out, pat.save_model)")
ap.add_argument("--dataset", default="digits")
args = ap.parse_args()
data = pat.load_dataset(args.dataset)

paths = [Path(p) for p in args.checkpoints]
if not paths:  # make three members to evaluate
    tmp = Path(tempfile.mkdtemp())
    for seed in range(3):
        cfg = pat.TrainConfig(model="lenet-s", epochs=3, lr=0.03, seed=seed, data=pat.DataConfig(batch_size=32))
        paths.append(tmp / f"member-{seed}.pt")
        pat.save_model(paths[-1], pat.train_parent(cfg, data=data).model)

members = [pat.load_model(p)[0] for p in paths]
probs, labels = pat.collect_probs(members, data.loader("test", batch_size=512))
report = pat.evaluate(probs, labels)
for path, m in zip(paths, report["members"], strict=True):
    print(f"{path.name:20} accuracy {m['accuracy']:.2%}  NLL {m['nll']:.4f}")
e = report["ensemble"]
print(f"{'ensemble':20} accuracy {e['accuracy']:.2%}  NLL {e['nll']:.4f}  ECE {e['ece']:.4f}")
