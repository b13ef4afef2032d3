"""``pat train`` and ``pat info``."""

from __future__ import annotations

import time

import click

from pat.cli.options import (
    BATCH_SIZE,
    data_options,
    describe_settings,
    device_options,
    force_option,
    plain_data,
    recipe_settings,
    recompute_bn_option,
)
from pat.cli.render import EpochProgress, console, fmt, metrics_table


@click.command()
@click.option("--model", default="lenet-s", help="Model name: pat's zoo (pat info --models) or tv:<torchvision name>.")
@data_options
@click.option("--epochs", default=None, type=int, help="Passes over the training split [default: the dataset's recipe, else 10].")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", help="SGD is Nesterov, momentum 0.9.")
@click.option("--lr", default=None, type=float,
              help="Base LR [default for sgd: the dataset's recipe, else 0.1; for adam: 0.001].")
@click.option("--weight-decay", default=5e-4, type=float)
@click.option("--schedule", default="parent", help="LR policy: parent (0.1 for 50%, linear to 0.001 at 90%), one-cycle, cosine, constant.")
@click.option("--seed", default=0, type=int, help="Initialisation seed.")
@click.option("--pretrained", is_flag=True,
              help="Start from torchvision's DEFAULT ImageNet weights (tv: models only; downloaded once into "
                   "torch's cache): the head is replaced for the dataset's classes, the first conv adapted "
                   "to its channels.")
@recompute_bn_option
@device_options
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write (e.g. parent.pt).")
@force_option
def train(model, dataset, data_dir, batch_size, val_fraction, data_seed, epochs, optimizer, lr,
          weight_decay, schedule, seed, pretrained, recompute_bn, device, amp, out, force) -> None:
    """Train a parent network into a checkpoint.

    An interrupted run resumes from OUT.partial when started again with the same --out.
    Under torchrun (torchrun --nproc-per-node N -m pat train ...) it trains data-parallel:
    each rank a share of every batch, the same result as one process.
    """
    from pat.config import DataConfig, TrainConfig
    from pat.data import load_dataset
    from pat.engine.distributed import init_ranks
    from pat.io import ensure_writable
    from pat.models import create_model
    from pat.parent import train_parent

    # validate everything before any work starts
    ensure_writable(out, force=force)
    d = plain_data(dataset, data_dir, val_fraction, data_seed)
    given = {"batch_size": batch_size, "lr": lr, "epochs": epochs}
    if optimizer == "adam" and lr is None:
        given["lr"] = 1e-3  # a recipe's LR is an SGD LR
    settings, sources = recipe_settings(d["dataset"], given, {"batch_size": BATCH_SIZE, "lr": 0.1, "epochs": 10})
    if optimizer == "adam" and lr is None:
        sources["lr"] = "adam default"
    config = TrainConfig(
        model=model, epochs=settings["epochs"], optimizer=optimizer, lr=settings["lr"], weight_decay=weight_decay,
        schedule=schedule, seed=seed, device=device, amp=amp, pretrained=pretrained, recompute_bn=recompute_bn,
        data=DataConfig(dataset=d["dataset"], data_dir=d["data_dir"], val_fraction=d["val_fraction"],
                        batch_size=settings["batch_size"], seed=d["seed"]),
    )
    dataset, epochs = d["dataset"], config.epochs
    data = load_dataset(dataset, data_dir=d["data_dir"], val_fraction=d["val_fraction"], seed=d["seed"])
    create_model(model, num_classes=data.num_classes, in_channels=data.in_channels)  # fail fast on a bad name

    ranks = init_ranks()  # under torchrun: one data-parallel run, rank 0 reports and writes
    say = console.print if ranks.is_main else (lambda *a, **k: None)
    where = f" on {ranks.world_size} ranks" if ranks.distributed else ""
    say(f"[bold]pat train[/] {model} on {dataset}{where}: {describe_settings(settings, sources)}, "
        f"{optimizer}, schedule {schedule}{', from ImageNet weights' if pretrained else ''}",
        highlight=False, soft_wrap=True)
    start = time.perf_counter()
    progress = [EpochProgress(f"train {model}")] if ranks.is_main else []
    result = train_parent(config, data=data, callbacks=progress, out=out, ranks=ranks)
    rows = [{"split": k.split("_")[0], "accuracy": result.metrics[k], "loss": result.metrics[k.replace("acc", "loss")]}
            for k in result.metrics if k.endswith("_acc")]
    say(metrics_table(f"{model}, {dataset}, {epochs} epochs ({time.perf_counter() - start:.0f}s)",
                      rows, ["split", "accuracy", "loss"]))
    if result.restored:
        say(f"[yellow]{collapse_warning(result.restored)}[/]", highlight=False, soft_wrap=True)
    say(f"saved [bold]{out}[/]")


def collapse_warning(restored: dict) -> str:
    """The line ``pat train`` prints when training collapsed and an earlier epoch was kept."""
    from pat.engine.guard import describe_restored

    return f"warning: {describe_restored(restored)}; lower --lr or change --schedule"


@click.command()
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False))
@click.option("--models", "list_all", is_flag=True, help="List the model and dataset names instead.")
def info(checkpoint, list_all) -> None:
    """Show what a checkpoint holds."""
    from pat.errors import PatError

    if list_all:
        from pat.data import list_datasets
        from pat.models import list_models

        console.print("models:   " + ", ".join(list_models()) + ", tv:<torchvision name>")
        console.print("datasets: " + ", ".join(list_datasets()))
        return
    if checkpoint is None:
        raise PatError("CHECKPOINT is required (or pass --models).")
    from pat.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint, argument="CHECKPOINT")
    state = ckpt.get("state_dict", {})
    total = sum(v.numel() for v in state.values() if v.is_floating_point())
    nonzero = sum(int(v.count_nonzero()) for v in state.values() if v.is_floating_point())
    arch = ckpt.get("arch") or {}
    rows = [
        {"key": "kind", "value": ckpt.get("kind")},
        {"key": "architecture", "value": f"{arch.get('name')} {arch.get('kwargs', {})}" if arch else None},
        {"key": "parameters (incl. buffers)", "value": f"{total:,}"},
        {"key": "non-zero", "value": f"{nonzero:,} ({nonzero / max(total, 1):.1%})"},
        {"key": "dataset", "value": ckpt.get("dataset")},
        {"key": "format / pat version", "value": f"{ckpt.get('format_version')} / {ckpt.get('pat_version')}"},
    ]
    rows += [{"key": k, "value": fmt(v)} for k, v in (ckpt.get("metrics") or {}).items()]
    rows += _cost_rows(ckpt.get("cost"))
    if ckpt.get("restored"):  # training collapsed; the file holds an earlier epoch
        r = ckpt["restored"]
        rows.append({"key": "kept epoch", "value": f"{r['epoch']} of {r['last']['epoch']} (the last collapsed: "
                                                   f"val acc {r['last']['val_acc']:.2%})"})
    console.print(metrics_table(str(checkpoint), rows, ["key", "value"]))
    if ckpt.get("config"):
        import yaml

        console.print("[bold]config[/]\n" + yaml.safe_dump(ckpt["config"], sort_keys=False).rstrip(), highlight=False)


def _flops(n: float) -> str:
    """``1.23 GFLOPs`` style: the largest unit that keeps the number at or above 1."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:g} "


def _cost_rows(cost) -> list[dict[str, str]]:
    """Rows for a checkpoint's training cost record (none for files written before costs)."""
    if not cost:
        return []
    rows = [
        {"key": "training steps", "value": f"{cost.get('steps', 0):,}"},
        {"key": "training samples", "value": f"{cost.get('samples', 0):,}"},
        {"key": "training FLOPs", "value": _flops(cost.get("flops", 0)) + "FLOPs"},
        {"key": "training seconds", "value": f"{cost.get('seconds', 0.0):.1f}"},
        {"key": "inference MACs / sample",
         "value": _flops(cost.get("forward_flops_per_sample", 0) // 2) + "MACs"},
    ]
    if cost.get("bn_samples"):
        rows.append({"key": "BatchNorm recomputed on", "value": f"{cost['bn_samples']:,} samples (one forward pass, charged)"})
    if cost.get("parent"):
        rows.append({"key": "started from", "value": str(cost["parent"])})
    return rows
