"""Choose a team from a pool on validation data, then report it on test.

A pool of children from one parent (any producer's members work the same way); greedy
selection adds, one at a time, the member that lowers the team's validation NLL most.

    python examples/greedy_selection.py [--size 3]
"""

import argparse

import pat

ap = argparse.ArgumentParser()
ap.add_argument("--size", type=int, default=3)
args = ap.parse_args()

data = pat.load_dataset("digits")
config = pat.TrainConfig(model="lenet-s", epochs=6, lr=0.03, data=pat.DataConfig(batch_size=32))
parent = pat.train_parent(config, data=data).model
pool = pat.split(parent, 6, method="random", sparsity=0.2)
pat.tune(pool, data, pat.TuneConfig(epochs=2), parent_lr=config.lr)

val, val_y = pat.collect_probs(pool, data.loader("val", batch_size=512))
selector = pat.create_selector("greedy", size=args.size, metric="nll").fit(val, val_y)
test, test_y = pat.collect_probs(pool, data.loader("test", batch_size=512))
team = pat.evaluate(test, test_y, selected=selector.selected_)["ensemble"]
everyone = pat.evaluate(test, test_y)["ensemble"]
print(f"team {selector.selected_}: accuracy {team['accuracy']:.2%}  NLL {team['nll']:.4f}")
print(f"all {len(pool)}:         accuracy {everyone['accuracy']:.2%}  NLL {everyone['nll']:.4f}")
