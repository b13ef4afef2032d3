"""StarSSE from one fine-tuned model, as an ensemble and as a soup (one model's cost).

Member 1 fine-tunes the starting model; every further member starts from member 1 and runs
one high-LR cycle, so all stay in one basin and their weight average is a model too.

    python examples/starsse_soup.py
"""

import tempfile
from pathlib import Path

import pat

data = pat.load_dataset("digits")
with tempfile.TemporaryDirectory() as tmp:  # the starting model: any pat checkpoint (or tv:<name>)
    start = Path(tmp) / "start.pt"
    pat.train_parent(pat.TrainConfig(model="lenet-s", epochs=6, lr=0.03, data=pat.DataConfig(batch_size=32)),
                     data=data, out=start)
    config = pat.StarSSEConfig(pretrained=str(start), members=4, epochs=2, cycle_epochs=2, lr=0.01,
                               data=pat.DataConfig(dataset="digits", batch_size=32))
    members = pat.starsse_members(config, data=data)

soup = pat.uniform_soup(members, bn_loader=data.loader("train", batch_size=128))
probs, labels = pat.collect_probs([soup, *members], data.loader("test", batch_size=512))
soup_row = pat.evaluate(probs, labels)["members"][0]
ensemble = pat.evaluate(probs, labels, selected=list(range(1, len(members) + 1)))["ensemble"]
print(f"ensemble of {len(members)} accuracy {ensemble['accuracy']:.2%}  NLL {ensemble['nll']:.4f}")
print(f"soup           accuracy {soup_row['accuracy']:.2%}  NLL {soup_row['nll']:.4f}")
