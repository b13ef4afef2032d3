"""Prune and Tune end to end on the embedded digits dataset (no download, about a minute).

Train a parent, split it into 6 children that each keep a random 80 % of its weights, tune
each briefly, and compare the ensemble's test accuracy and NLL with the parent's.

    python examples/prune_and_tune_digits.py
"""

import torch

import pat

data = pat.load_dataset("digits")
config = pat.TrainConfig(model="lenet-s", epochs=10, lr=0.03, data=pat.DataConfig(batch_size=32))
parent = pat.train_parent(config, data=data).model

children = pat.split(parent, 6, method="random", sparsity=0.2)
pat.tune(children, data, pat.TuneConfig(epochs=4), parent_lr=config.lr)

probs, labels = pat.collect_probs([parent, *children], data.loader("test", batch_size=512))
report = pat.evaluate(probs, labels, selected=list(range(1, len(children) + 1)))
p = report["members"][0]
e = report["ensemble"]
print(f"parent:   accuracy {p['accuracy']:.2%}  NLL {p['nll']:.4f}")
print(f"ensemble: accuracy {e['accuracy']:.2%}  NLL {e['nll']:.4f}")
assert torch.isfinite(probs).all()
