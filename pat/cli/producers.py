"""``pat pool``, ``pat starsse``, ``pat sharpbalance`` and ``pat sharpness``: other member producers."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import click

from pat.cli.options import (
    BATCH_SIZE,
    check_shape,
    data_options,
    device_options,
    force_option,
    lock_options,
    plain_data,
    producer_data,
    recipe_settings,
    recompute_bn_option,
)
from pat.cli.render import EpochProgress, console, err_console, metrics_table

__all__ = ["pool", "starsse", "sharpbalance", "sharpness"]

_MEMBER_COLUMNS = ["name", "val_acc", "test_acc", "test_loss"]


def _floats(text: str | None, argument: str) -> tuple[float, ...] | None:
    from pat.errors import PatError

    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise PatError(f"{argument} must be comma-separated numbers. Got {text!r}.") from None


def _data_config(out, producer, dataset, data_dir, batch_size, val_fraction, data_seed, force):
    """The producer's data: a rerun continuing ``out`` takes what it records (conflicts refused)."""
    from pat.config import DataConfig

    return DataConfig(**producer_data(out, producer, dataset=dataset, data_dir=data_dir, batch_size=batch_size,
                                      val_fraction=val_fraction, data_seed=data_seed, force=force))


def _progress(name: str) -> list[EpochProgress]:
    return [EpochProgress(name)]


def _report(record: Mapping[str, Any], skipped: bool) -> None:
    m = record.get("metrics", {})
    acc = f"test {m['test_acc']:.3f}" if "test_acc" in m else ""
    word = "finished earlier, skipped" if skipped else "done"
    err_console.print(f"[bold]{record['name']}[/] {word} {acc}", highlight=False)


def _summary(title: str, ens: Any, extra: list[str]) -> None:
    rows = [{"name": m["name"], **{k: m["recipe"].get(k) for k in extra}, **m["metrics"]}
            for m in ens.members]
    console.print(metrics_table(title, rows, ["name", *extra, *_MEMBER_COLUMNS[1:]]))
    console.print(f"saved [bold]{ens.path}[/] ({len(ens.members)} members)")


@click.command()
@click.option("--model", default="lenet-s", help="Model name: pat's zoo or tv:<torchvision name>.")
@data_options(resumes=True)
@click.option("--epochs", default=10, type=int, help="Epochs per member.")
@click.option("--policies", default="multistep,one-cycle,warmup-cosine,composite",
              help="Comma-separated LR policies (see docs/schedules.md).")
@click.option("--lrs", default=None, help="Comma-separated LRs for every policy [default: the paper's grid per policy].")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd")
@click.option("--weight-decay", default=5e-4, type=float)
@click.option("--seed", default=0, type=int, help="Seeds every member: member k is initialised and shuffled with seed x 100003 + k.")
@recompute_bn_option
@device_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Ensemble directory to write.")
@click.option("--plot-policies", "plot", default=None, type=click.Path(dir_okay=False),
              help="Also draw every member's LR policy into this PNG.")
@force_option
@lock_options()
def pool(model, dataset, data_dir, batch_size, val_fraction, data_seed, epochs, policies, lrs,
         optimizer, weight_decay, seed, recompute_bn, device, amp, out, plot, force) -> None:
    """Train a pool: one model per (LR policy, LR).

    Every (policy, LR) pair becomes one member of one ensemble directory (LREnsemble).

    A rerun with the same options skips finished members; under torchrun each rank trains
    its share of the members.
    """
    from pat.engine.distributed import init_ranks
    from pat.producers.lr_pool import PoolConfig, plot_policies, pool_jobs, train_pool

    config = PoolConfig(
        model=model, data=_data_config(out, "pool", dataset, data_dir, batch_size, val_fraction, data_seed, force),
        epochs=epochs, policies=tuple(p for p in policies.split(",") if p.strip()),
        lrs=_floats(lrs, "--lrs"), optimizer=optimizer, weight_decay=weight_decay, seed=seed,
        recompute_bn=recompute_bn, device=device, amp=amp,
    )  # fmt: skip
    ranks = init_ranks()
    if plot and ranks.is_main:
        console.print(f"policies drawn in [bold]{plot_policies(config, plot)}[/]")
    start = time.perf_counter()
    ens = train_pool(config, out, force=force, callbacks=_progress, on_member=_report, ranks=ranks)
    if ranks.is_main:
        _summary(f"LR pool: {len(pool_jobs(config))} members, {model}, {config.data.dataset}, {epochs} epochs "
                 f"({time.perf_counter() - start:.0f}s)", ens, ["policy", "lr"])


@click.command()
@click.option("--pretrained", required=True, help="A pat checkpoint, or tv:<torchvision name> for ImageNet weights.")
@click.option("--model", default=None, help="Expected architecture of --pretrained (checked).")
@data_options(resumes=True)
@click.option("--members", default=5, type=int, help="Member 1 (fine-tuned) plus members-1 cycles.")
@click.option("--epochs", default=10, type=int, help="Fine-tuning epochs of member 1.")
@click.option("--cycle-epochs", default=5, type=int, help="Epochs of each further member's cycle.")
@click.option("--lr", default=0.01, type=float, help="Fine-tuning LR (cosine to 0).")
@click.option("--cycle-lr-mult", default=2.0, type=float, help="Each cycle starts at lr times this.")
@click.option("--sse", is_flag=True, help="Start member k from member k-1 (plain SSE) instead of member 1.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd")
@click.option("--weight-decay", default=5e-4, type=float)
@click.option("--seed", default=0, type=int, help="Seeds a new classifier head and member k's data order (seed x 100003 + k).")
@recompute_bn_option
@device_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Ensemble directory to write.")
@force_option
@lock_options()
def starsse(pretrained, model, dataset, data_dir, batch_size, val_fraction, data_seed, members, epochs,
            cycle_epochs, lr, cycle_lr_mult, sse, optimizer, weight_decay, seed, recompute_bn, device, amp,
            out, force) -> None:
    """StarSSE: snapshot members around one fine-tune.

    Fine-tune a pretrained model, then snapshot members that all restart from it.

    A rerun with the same options keeps finished members.
    """
    from pat.engine.distributed import init_ranks
    from pat.producers.starsse import StarSSEConfig, train_starsse

    config = StarSSEConfig(
        pretrained=pretrained, model=model,
        data=_data_config(out, "starsse", dataset, data_dir, batch_size, val_fraction, data_seed, force),
        members=members,
        epochs=epochs, cycle_epochs=cycle_epochs, lr=lr, cycle_lr_mult=cycle_lr_mult, sse=sse,
        optimizer=optimizer, weight_decay=weight_decay, seed=seed, recompute_bn=recompute_bn, device=device,
        amp=amp,
    )  # fmt: skip
    ranks = init_ranks()
    start = time.perf_counter()
    ens = train_starsse(config, out, force=force, callbacks=_progress, on_member=_report, ranks=ranks)
    if ranks.is_main:
        _summary(f"{'SSE' if sse else 'StarSSE'}: {members} members, {config.data.dataset} "
                 f"({time.perf_counter() - start:.0f}s)", ens, ["start", "peak_lr"])


@click.command()
@click.option("--model", default="lenet-s", help="Model name: pat's zoo or tv:<torchvision name>.")
@data_options(resumes=True)
@click.option("--members", default=3, type=int, help="Ensemble members (>= 2).")
@click.option("--epochs", default=10, type=int, help="All epochs, both phases.")
@click.option("--initial-epochs", default=5, type=int, help="Phase 1: full-SAM epochs before the subsets are chosen.")
@click.option("--rho", default=0.05, type=float, help="SAM perturbation radius.")
@click.option("--adaptive", is_flag=True, help="ASAM (scale-invariant) perturbation.")
@click.option("--flat-ratio", default=0.5, type=float, help="Share of samples each other member claims, in [0, 1].")
@click.option("--subset", type=click.Choice(["others-flat", "others-sharp", "random"]), default="others-flat",
              help="How member i's SAM subset is chosen from the other members' scores.")
@click.option("--sam-only", "mode", flag_value="sam", help="Baseline: SAM on every sample throughout.")
@click.option("--plain", "mode", flag_value="plain", help="Baseline: plain SGD throughout (a deep ensemble).")
@click.option("--lr", default=0.1, type=float)
@click.option("--schedule", default="cosine", help="LR policy over all epochs (see docs/schedules.md).")
@click.option("--weight-decay", default=5e-4, type=float)
@click.option("--seed", default=0, type=int, help="Seeds every member: member i is initialised and shuffled with seed x 100003 + i.")
@recompute_bn_option
@device_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Ensemble directory to write.")
@force_option
@lock_options()
def sharpbalance(model, dataset, data_dir, batch_size, val_fraction, data_seed, members, epochs,
                 initial_epochs, rho, adaptive, flat_ratio, subset, mode, lr, schedule, weight_decay,
                 seed, recompute_bn, device, amp, out, force) -> None:
    """SharpBalance: diverse, flat SAM members.

    Train SAM members that are flat on different samples.

    Phase 1 trains every member with SAM; each then scores every training sample's
    sharpness; in phase 2 member i uses SAM on the samples the other members find flat
    and plain SGD on the rest. A rerun with the same options continues.
    """
    from pat.engine.distributed import init_ranks
    from pat.producers.sharpbalance import SharpBalanceConfig, train_sharpbalance

    config = SharpBalanceConfig(
        model=model, data=_data_config(out, "sharpbalance", dataset, data_dir, batch_size, val_fraction,
                                       data_seed, force),
        members=members, epochs=epochs, initial_epochs=initial_epochs, rho=rho, adaptive=adaptive,
        flat_ratio=flat_ratio, subset=subset, mode=mode or "sharpbalance", lr=lr, schedule=schedule,
        weight_decay=weight_decay, seed=seed, recompute_bn=recompute_bn, device=device, amp=amp,
    )  # fmt: skip
    ranks = init_ranks()
    start = time.perf_counter()
    ens = train_sharpbalance(config, out, force=force, callbacks=_progress, on_member=_report, ranks=ranks)
    if ranks.is_main:
        _summary(f"SharpBalance ({config.mode}): {members} members, {model}, {config.data.dataset} "
                 f"({time.perf_counter() - start:.0f}s)", ens, ["sam_fraction"])


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@data_options
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test")
@click.option("--rho", default=0.05, type=float, help="Perturbation radius (relative to |w|).")
@click.option("--draws", default=5, type=int, help="Random perturbations per batch.")
@click.option("--max-batches", default=None, type=int, help="Measure on the first batches only.")
@click.option("--seed", default=0, type=int, help="Seed of the random perturbations.")
@device_options
def sharpness(checkpoint, dataset, data_dir, batch_size, val_fraction, data_seed, split, rho, draws,
              max_batches, seed, device, amp) -> None:
    """Measure a model's sharpness at radius rho.

    The average loss increase under adaptive random and worst-case weight perturbations.
    """
    from itertools import islice

    from pat.data import load_dataset
    from pat.engine.checkpoint import load_model
    from pat.engine.loop import resolve_device
    from pat.engine.sam import measure_sharpness
    from pat.errors import check

    check(rho > 0, f"rho must be positive. Got {rho}.")
    check(max_batches is None or max_batches > 0, f"max_batches must be positive. Got {max_batches}.")
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, device=dev, argument="CHECKPOINT")
    d = plain_data(dataset or ckpt.get("dataset"), data_dir, val_fraction, data_seed)  # default: its own data
    dataset = d["dataset"]
    data = load_dataset(dataset, data_dir=d["data_dir"], val_fraction=d["val_fraction"], seed=d["seed"])
    check_shape(data, ckpt, where=f"CHECKPOINT {checkpoint!r}")
    batch_size = recipe_settings(dataset, {"batch_size": batch_size}, {"batch_size": BATCH_SIZE})[0]["batch_size"]
    loader = data.loader(split, batch_size=batch_size, shuffle=False, augment=False, device=dev)
    batches = list(islice(loader, max_batches)) if max_batches else loader
    result = measure_sharpness(model, batches, rho=rho, draws=draws, seed=seed)
    rows = [{"key": "loss", "value": result["loss"]},
            {"key": f"random sharpness (rho={rho:g}, adaptive)", "value": result["random"]},
            {"key": f"worst-case sharpness (rho={rho:g}, adaptive)", "value": result["worst"]}]
    console.print(metrics_table(f"{checkpoint} on {dataset} {split}", rows, ["key", "value"]))
