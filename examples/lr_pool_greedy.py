"""An LR-policy pool (LREnsemble), then a greedy team chosen on validation data.

Every (policy, LR) pair trains one model from scratch; all are kept, and greedy selection
adds, one at a time, the member that lowers the team's validation NLL most.

    python examples/lr_pool_greedy.py [--size 2]
"""

import argparse

import pat

ap = argparse.ArgumentParser()
ap.add_argument("--size", type=int, default=2)
args = ap.parse_args()

data = pat.load_dataset("digits")
config = pat.PoolConfig(model="lenet-s", epochs=6, policies=("one-cycle", "warmup-cosine"), lrs=(0.05, 0.02),
                        data=pat.DataConfig(dataset="digits", batch_size=32))
pool = pat.pool_members(config, data=data)  # in memory; pat.train_pool(config, "pool/") writes a directory

val, val_y = pat.collect_probs(pool, data.loader("val", batch_size=512))
selector = pat.create_selector("greedy", size=args.size, metric="nll").fit(val, val_y)
test, test_y = pat.collect_probs(pool, data.loader("test", batch_size=512))
members = pat.evaluate(test, test_y)["members"]
for model, row in zip(pool, members, strict=True):
    print(f"{model.pat_member.name:<22} accuracy {row['accuracy']:.2%}")
team = pat.evaluate(test, test_y, selected=selector.selected_)["ensemble"]
print(f"team {[pool[i].pat_member.name for i in selector.selected_]}: "
      f"accuracy {team['accuracy']:.2%}  NLL {team['nll']:.4f}")
