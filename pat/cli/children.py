"""``pat split``, ``pat tune``, ``pat run`` and ``pat demo``: the Prune-and-Tune flow."""

from __future__ import annotations

import click

from pat.cli.options import (
    BATCH_SIZE,
    data_options,
    describe_settings,
    device_options,
    ensemble_data,
    force_option,
    lock_options,
    override_option,
    recipe_settings,
)
from pat.cli.render import EpochProgress, console, metrics_table

CHILD_COLUMNS = ["name", "accuracy", "nll", "nll_ts", "ece", "brier", "ensemble_acc"]


def _progress(stage: str):
    return [EpochProgress(stage)]


@click.command()
@click.option("--parent", required=True, type=click.Path(dir_okay=False), help="Parent checkpoint (pat train --out).")
@click.option("--children", default=6, type=int, help="Number of children M.")
@click.option("--method", type=click.Choice(["random", "anti-random", "partition", "cyclic"]), default=None,
              help="Mask method [default: random].")
@click.option("--anti-random", "anti_random", is_flag=True, help="Shorthand for --method anti-random.")
@click.option("--sparsity", default=None, type=float,
              help="Share of units pruned [default: 0.2; 0.5 for anti-random; implied 1-1/M for partition].")
@click.option("--level", type=click.Choice(["connection", "neuron"]), default="connection")
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer")
@click.option("--physical", is_flag=True, help="Neuron level: remove pruned channels (thinner, faster children).")
@click.option("--pack", is_flag=True,
              help="With --level neuron --method partition --physical: write the children as one packed "
                   "network (packed.pt) that runs them all at once.")
@click.option("--seed", default=0, type=int, help="Mask seed: same seed, same masks on any device.")
@click.option("--exclude-first", is_flag=True, help="Leave the first layer dense.")
@click.option("--include-classifier", is_flag=True, help="Prune the final classifier layer too.")
@click.option("--rescale/--no-rescale", default=None,
              help="Scale kept weights by n/kept so children start at the parent's scale "
                   "[default: on at connection level; layers that feed a norm layer are left alone].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Ensemble directory to write.")
@force_option
@lock_options()
def split(parent, children, method, anti_random, sparsity, level, scope, physical, pack, seed, exclude_first,
          include_classifier, rescale, out, force) -> None:
    """Prune a parent into diverse children."""
    from pat.config import SplitConfig
    from pat.errors import PatError
    from pat.splitting import split_to_directory

    if anti_random and method not in (None, "anti-random"):
        raise PatError(f"--anti-random conflicts with --method {method}.")
    method = "anti-random" if anti_random else method or SplitConfig().method
    if sparsity is None and method != "partition":
        sparsity = 0.5 if method == "anti-random" else SplitConfig().sparsity
    config = SplitConfig(children=children, method=method, sparsity=sparsity, level=level, scope=scope,
                         physical=physical, seed=seed, include_first=not exclude_first,
                         include_classifier=include_classifier, rescale=rescale, pack=pack)
    ens = split_to_directory(parent, out, config, force=force)
    rows = [{"name": m["name"], **m.get("stats", {})} for m in ens.members]
    packed = " packed" if pack else ""
    console.print(metrics_table(f"{len(rows)}{packed} {method} children of {parent} → {out}", rows,
                                ["name", "kept_params", "total_params", "sparsity", "macs"]))


@click.command()
@click.argument("children_dir", type=click.Path())
@click.option("--epochs", default=10, type=int, help="Tuning epochs per child.")
@click.option("--schedule", type=click.Choice(["one-cycle", "constant"]), default="one-cycle")
@click.option("--max-lr", default=None, type=float,
              help="One-cycle peak LR [default: 0.2 x the LR the parent trained at].")
@click.option("--lr", default=0.01, type=float, help="LR of the constant schedule.")
@click.option("--bagging", default=None, type=float, help="Each child trains on its own seeded share (e.g. 0.9).")
@click.option("--recompute-bn/--keep-bn", default=True,
              help="Recompute BatchNorm statistics on each child's data after tuning.")
@click.option("--cycle-momentum", is_flag=True, help="Cycle momentum 0.95→0.85 with the one-cycle LR.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd")
@click.option("--step", default="sgd", help="Step rule: sgd, sam, ...")
@click.option("--seed", default=0, type=int, help="Bagging and shuffling seed.")
@click.option("--together", is_flag=True,
              help="Tune all children in one grouped network, one optimizer step for all (same result).")
@click.option("--auto-together", is_flag=True,
              help="Tune together only where one timed step says it is faster than one by one.")
@data_options(from_manifest=True)
@override_option
@device_options
@lock_options("children_dir")
def tune(children_dir, epochs, schedule, max_lr, lr, bagging, recompute_bn, cycle_momentum, optimizer, step, seed,
         together, auto_together, dataset, data_dir, batch_size, val_fraction, data_seed, override_data, device,
         amp) -> None:
    """Tune the children that are not tuned yet.

    Each child is saved the moment it finishes, so a rerun skips finished children. Under torchrun (torchrun --nproc-per-node N -m pat tune ...) the children are sharded
    across ranks.
    """
    from pat.comparison import Comparison, recorded_parent
    from pat.config import DataConfig, TuneConfig
    from pat.engine.distributed import init_ranks
    from pat.errors import PatError
    from pat.store import EnsembleDir
    from pat.tuner import tune_directory
    from pat.tuner.directory import check_children

    if together and auto_together:
        raise PatError("--together conflicts with --auto-together; give one of them.")
    check_children(EnsembleDir.load(children_dir, argument="CHILDREN_DIR"))  # before the data loads

    # validate before any work: the data the children were made for, unless told otherwise
    d, data = ensemble_data(children_dir, dataset=dataset, data_dir=data_dir, val_fraction=val_fraction,
                            data_seed=data_seed, override=override_data, argument="CHILDREN_DIR")
    dataset = d["dataset"]
    settings, sources = recipe_settings(dataset, {"batch_size": batch_size}, {"batch_size": BATCH_SIZE})
    data_cfg = DataConfig(dataset=dataset, data_dir=d["data_dir"], val_fraction=d["val_fraction"],
                          batch_size=settings["batch_size"], seed=d["seed"])
    config = TuneConfig(epochs=epochs, schedule=schedule, max_lr=max_lr, lr=lr, bagging=bagging,
                        recompute_bn=recompute_bn,
                        cycle_momentum=cycle_momentum, optimizer=optimizer, step=step, seed=seed,
                        together="auto" if auto_together else together, device=device, amp=amp, data=data_cfg)
    ranks = init_ranks()
    config = config if not ranks.distributed else _with_device(config, ranks.device(device))
    if ranks.is_main:
        console.print(f"[bold]pat tune[/] {children_dir} on {dataset} (data seed {d['seed']}, val fraction "
                      f"{d['val_fraction']:g}): {describe_settings(settings, sources)}, epochs {epochs}",
                      highlight=False, soft_wrap=True)
    done = lambda record: console.print(  # noqa: E731
        f"[green]✓[/] {record['name']}  val acc {record['metrics'].get('val_acc', float('nan')):.4f}"
        f"  test acc {record['metrics'].get('test_acc', float('nan')):.4f}", highlight=False)
    # one set of progress bars (rank 0's); each rank still reports the children it finished
    progress = _progress if ranks.is_main else (lambda name: [])
    tune_directory(children_dir, data, config, ranks=ranks, callbacks=progress, on_done=done)
    if ranks.is_main:  # the parent's row on test, and its check on validation, share one validation pass
        compared = Comparison(children_dir, data, parent_path=recorded_parent(children_dir), device=config.device)
        console.print(metrics_table(f"{children_dir} on {dataset} (test)", compared.rows()[0], CHILD_COLUMNS))
        _validation_line(compared.parent_check())


def _with_device(config, device: str):
    import dataclasses

    return dataclasses.replace(config, device=device)


@click.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Override the config's out directory.")
@force_option
def run(config_file, out, force) -> None:
    """Parent → split → tune → eval from a YAML file.

    Every finished stage is kept, so rerunning continues an interrupted run. Under torchrun
    (torchrun --nproc-per-node N -m pat run CONFIG_FILE) the parent trains data-parallel and
    the children are sharded across ranks.
    """
    import dataclasses

    from pat.config import RunConfig, from_dict, load_yaml

    config = from_dict(RunConfig, load_yaml(config_file), where=str(config_file))
    if out is not None:
        config = dataclasses.replace(config, out=out)
    _run_on_ranks(config, force, announce=_announce)


def _run_on_ranks(config, force: bool, announce=lambda line: None):
    """``pat.pipeline.run`` on every torchrun rank (or the one process); rank 0 alone prints.

    Returns the run's result on rank 0, None on the others.
    """
    import sys

    from pat.engine.distributed import init_ranks
    from pat.errors import PatError
    from pat.pipeline import run as run_pipeline

    ranks = init_ranks()
    try:
        result = run_pipeline(config, force=force, progress=_progress if ranks.is_main else lambda stage: [],
                              announce=announce, ranks=ranks)
    except PatError:
        if ranks.is_main:
            raise
        sys.exit(2)  # the same refusal, which rank 0 shows
    if result is not None:
        _render(result)
    return result


def _announce(line: str) -> None:
    console.print(f"[bold]{line}[/]", highlight=False)


@click.command()
@click.option("--out", default="runs/demo", type=click.Path(file_okay=False),
              help="Where the demo writes its runs (OUT/seed-0, OUT/seed-1, ...).")
@click.option("--seeds", default=5, show_default=True, type=click.IntRange(min=1),
              help="Runs, seeded 0..SEEDS-1, summarized as mean ± standard error (one seed's 359 test "
                   "images decide nothing).")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--force", is_flag=True, help="Rerun every stage even if OUT holds a finished demo.")
def demo(out, seeds, device, force) -> None:
    """Prune and Tune end to end on embedded digits."""
    import dataclasses
    from pathlib import Path

    from pat.engine.distributed import init_ranks
    from pat.pipeline import demo_config

    results = []
    for seed in range(seeds):
        config = demo_config(str(Path(out) / f"seed-{seed}"), seed=seed)
        config = dataclasses.replace(
            config, parent=dataclasses.replace(config.parent, device=device),
            tune=dataclasses.replace(config.tune, device=device))
        if init_ranks().is_main:
            console.print(f"[bold]pat demo[/], seed {seed} of {seeds}: LeNet-S parent on digits → "
                          f"{config.split.describe()} → one-cycle tuning → softmax average", highlight=False,
                          soft_wrap=True)
        results.append(_run_on_ranks(config, force))
    if seeds > 1 and init_ranks().is_main:
        _render_seeds(results)


def _render_seeds(results) -> None:
    """The runs' mean ± standard error, and the ensemble against the others paired seed by seed."""
    from pat.comparison import across_seeds

    summary = across_seeds(results)
    n = summary["seeds"]
    keys = [k for k in ("accuracy", "nll_ts", "ece") if k in summary["rows"][0]]
    rows = [{"name": r["name"], **{k: f"{r[k][0]:.4f} ± {r[k][1]:.4f}" for k in keys}} for r in summary["rows"]]
    console.print(metrics_table(f"test split, {n} seeds (mean ± standard error)", rows, ["name", *keys]))
    ensemble = next(r["name"] for r in summary["rows"] if r["name"].startswith("ensemble"))
    for other, versus in summary["versus"].items():
        parts = [f"{k} {m:+.4f} ± {se:.4f} (better on {better} of {n})" for k, (m, se, better) in versus.items()]
        console.print(f"{ensemble} − {other}, paired over seeds: " + ", ".join(parts), highlight=False, soft_wrap=True)


def _validation_line(check: dict) -> None:
    """The ensemble against its parent on validation, and a one-line warning when it is worse."""
    from pat.engine.guard import describe_restored

    if not check:
        console.print("ensemble vs parent on validation: not compared (no validation split or parent file)")
        return
    e, p = check["ensemble"], check["parent"]
    console.print(f"validation: ensemble of {check['members']} accuracy {e['accuracy']:.2%}, NLL {e['nll']:.4f} "
                  f"vs parent {p['accuracy']:.2%}, NLL {p['nll']:.4f} "
                  f"({e['accuracy'] - p['accuracy']:+.2%}, {e['nll'] - p['nll']:+.4f}{_se(check)}; images only the "
                  f"ensemble gets right {check['flips']['won']}, only the parent {check['flips']['lost']})",
                  highlight=False, soft_wrap=True)
    if check.get("parent_restored"):
        console.print(f"[yellow]warning:[/] {describe_restored(check['parent_restored'], 'the parent')}; "
                      "lower parent.lr (with budget.trunk it is held constant)", highlight=False, soft_wrap=True)
    for name, restored in (check.get("children_restored") or {}).items():
        console.print(f"[yellow]warning:[/] {describe_restored(restored, name)}; lower the children's peak LR "
                      "(--max-lr, tune.max_lr)", highlight=False, soft_wrap=True)
    if check.get("parent_at_chance"):
        console.print(f"[yellow]warning:[/] the parent is at chance on validation ({p['accuracy']:.2%}): it did "
                      "not learn — with budget.trunk its LR is held constant; lower parent.lr or set "
                      "budget.trunk: false", highlight=False, soft_wrap=True)
    if check["worse"]:
        console.print("[yellow]warning:[/] the ensemble is worse than its parent on validation: give each "
                      "child more tuning steps (more epochs, fewer children) or keep more of the parent "
                      "(lower sparsity); see docs/tuning.md", highlight=False, soft_wrap=True)


def _se(check: dict) -> str:
    """`` ± SE`` of the paired NLL difference, where the check has it (runs before decision 69 do not)."""
    diff = check.get("nll_diff")
    return f" ± {diff['se']:.4f}" if diff else ""


def _trend_line(trend: dict | None) -> None:
    """A note when the run's independent model was still improving at its end (pat's losing regime)."""
    if not trend or not trend["still_improving"]:
        return
    console.print(f"[yellow]note:[/] the independent model was still improving at its end (lowest validation "
                  f"loss at epoch {trend['best_epoch']} of {trend['epochs']}); there one model of the budget has "
                  "beaten pat's six masked children in every measurement, and its physical pair on full "
                  "Fashion-MNIST but not on digits or ResNet-8 — docs/tuning.md", highlight=False, soft_wrap=True)


def _render(result) -> None:
    console.print(metrics_table(f"test split — {result.out}", result.rows, CHILD_COLUMNS))
    parent = result.rows[0]
    ensemble = next(r for r in result.rows if r["name"].startswith("ensemble"))
    others = [parent, *(r for r in result.rows if r["name"].startswith("independent"))]
    for other in others:
        calibrated = (f", NLL (TS) {ensemble['nll_ts'] - other['nll_ts']:+.4f}"
                      if ensemble.get("nll_ts") is not None and other.get("nll_ts") is not None else "")
        console.print(f"{ensemble['name']} vs {other['name']}: accuracy {ensemble['accuracy'] - other['accuracy']:+.2%}, "
                      f"NLL {ensemble['nll'] - other['nll']:+.4f}{calibrated}, ECE {ensemble['ece'] - other['ece']:+.4f}",
                      highlight=False)
    d = result.diversity
    if d.get("disagreement") is not None:
        console.print(f"children disagree on {d['disagreement']:.1%} of test samples (mean pairwise); "
                      f"total time {result.seconds:.0f}s", highlight=False)
    _validation_line(result.validation)
    _trend_line(result.baseline_trend)
