"""A soup: one network holding the average of its children's weights (one model's cost).

Children that anneal from one parent stay in its basin, so their weight average is a
model too; BatchNorm statistics are recomputed on training data.

    python examples/soup_children.py
"""

import pat

data = pat.load_dataset("digits")
config = pat.TrainConfig(model="lenet-s", epochs=6, lr=0.03, data=pat.DataConfig(batch_size=32))
parent = pat.train_parent(config, data=data).model
children = pat.split(parent, 4, method="random", sparsity=0.2)
pat.tune(children, data, pat.TuneConfig(epochs=2), parent_lr=config.lr)

soup = pat.uniform_soup(children, bn_loader=data.loader("train", batch_size=128))
probs, labels = pat.collect_probs([parent, soup, *children], data.loader("test", batch_size=512))
members = pat.evaluate(probs, labels)["members"]
ensemble = pat.evaluate(probs, labels, selected=list(range(2, len(children) + 2)))["ensemble"]
for name, m in (("parent", members[0]), ("soup", members[1]), ("ensemble", ensemble)):
    print(f"{name:9} accuracy {m['accuracy']:.2%}  NLL {m['nll']:.4f}")
