"""``pat eval``, ``pat select`` and ``pat soup``: members of any producer, one module."""

from __future__ import annotations

import click

from pat.cli.options import force_option
from pat.cli.render import console, fmt, metrics_table

METRICS = ["accuracy", "nll", "ece", "brier"]


def _data(ensemble_dir: str, dataset: str | None, data_dir: str, val_fraction: float, data_seed: int):
    """The dataset named on the command line, else the one recorded in the manifest."""
    from pat.data import load_dataset
    from pat.ensemble.store import EnsembleDir
    from pat.errors import PatError

    ens = EnsembleDir.load(ensemble_dir)
    name = dataset or ens.manifest.get("dataset")
    if name is None:
        raise PatError(f"ENSEMBLE_DIR {ensemble_dir!r} records no dataset; pass --dataset.")
    return load_dataset(name, data_dir=data_dir, val_fraction=val_fraction, seed=data_seed)


def ensemble_data_options(func):
    for deco in reversed([
        click.option("--dataset", default=None, help="Dataset [default: the one recorded in the manifest]."),
        click.option("--data-dir", default="./data", type=click.Path(file_okay=False)),
        click.option("--val-fraction", default=0.1, type=float, help="Must match the members' training split."),
        click.option("--data-seed", default=0, type=int),
        click.option("--device", default="auto"),
    ]):
        func = deco(func)
    return func


@click.command("eval")
@click.argument("ensemble_dir", type=click.Path())
@ensemble_data_options
@click.option("--split", type=click.Choice(["test", "val"]), default="test")
@click.option("--corruptions", is_flag=True, help="Also evaluate 8 corruptions at severities 1-5.")
@click.option("--plot", "plot_dir", default=None, type=click.Path(file_okay=False),
              help="Write reliability, accuracy-vs-size and disagreement PNGs here.")
def eval_(ensemble_dir, dataset, data_dir, val_fraction, data_seed, device, split, corruptions, plot_dir) -> None:
    """Evaluate members and ensemble (metrics.json)."""
    from pat.ensemble.report import evaluate_directory

    data = _data(ensemble_dir, dataset, data_dir, val_fraction, data_seed)
    report = evaluate_directory(ensemble_dir, data, split=split, corruptions=corruptions,
                                plot_dir=plot_dir, device=device, data_dir=data_dir)
    everyone = report["all"]
    rows = [{"name": n, **m} for n, m in zip(report["names"], everyone["members"], strict=True)]
    rows.append({"name": f"ensemble (all {len(rows)})", **everyone["ensemble"]})
    if "selection" in report:
        sel = report["selection"]
        rows.append({"name": f"{sel['method']} team ({len(sel['selected'])})", **sel["ensemble"]})
    console.print(metrics_table(f"{ensemble_dir} — {data.name} {split}", rows, ["name", *METRICS]))
    d = everyone["diversity"]
    console.print(f"disagreement {fmt(d['disagreement'])}  disagreement/error {fmt(d['disagreement_error_ratio'])}"
                  f"  prediction variance {fmt(d['prediction_variance'])}"
                  f"  focal diversity ({d['focal_measure']}) {fmt(d['focal_diversity'])}", highlight=False)
    if corruptions:
        by_name: dict[str, list] = {}
        for row in report["corruptions"]:
            by_name.setdefault(row["corruption"], []).append(row)
        summary = [{"corruption": k, **{m: sum(r[m] for r in v) / len(v) for m in ["accuracy", "member_accuracy", "nll", "ece"]}}
                   for k, v in by_name.items()]
        console.print(metrics_table(f"corrupted test data, {report['corruption_source']} (mean over severities 1-5)", summary,
                                    ["corruption", "accuracy", "member_accuracy", "nll", "ece"]))
    if plot_dir:
        console.print(f"plots in [bold]{plot_dir}[/]")


@click.command()
@click.argument("ensemble_dir", type=click.Path())
@click.option("--method", default="greedy", help="all, top-k, random, brute-force, greedy, focal.")
@click.option("--size", default=None, type=int, help="Team size (max size for brute-force).")
@click.option("--metric", default=None, type=click.Choice(["nll", "accuracy"]), help="What greedy/top-k/brute-force optimise.")
@click.option("--measure", default=None, help="Focal diversity measure: generalized, kw, disagreement, kappa, q.")
@click.option("--seed", default=None, type=int, help="Seed of the random selector.")
@ensemble_data_options
def select(ensemble_dir, method, size, metric, measure, seed, dataset, data_dir, val_fraction, data_seed, device) -> None:
    """Choose a team on the validation split."""
    from pat.ensemble.report import select_directory

    options = {k: v for k, v in {"metric": metric, "measure": measure, "seed": seed}.items() if v is not None}
    data = _data(ensemble_dir, dataset, data_dir, val_fraction, data_seed)
    result = select_directory(ensemble_dir, data, method, size=size, device=device, **options)
    rows = [{"name": n, "weight": w} for n, w in zip(result["selected"], result["weights"], strict=True)]
    console.print(metrics_table(f"{method} team", rows, ["name", "weight"]))
    console.print(f"validation accuracy: team {result['val']['accuracy']:.4f}, all members "
                  f"{result['val_all']['accuracy']:.4f}; pat eval {ensemble_dir} shows the test split", highlight=False)


@click.command()
@click.argument("ensemble_dir", type=click.Path())
@click.option("--greedy", is_flag=True, help="Greedy soup: add a member only if validation accuracy does not drop.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write.")
@force_option
@ensemble_data_options
def soup(ensemble_dir, greedy, out, force, dataset, data_dir, val_fraction, data_seed, device) -> None:
    """Average members' weights into one model."""
    from pat.ensemble.report import soup_directory

    data = _data(ensemble_dir, dataset, data_dir, val_fraction, data_seed)
    result = soup_directory(ensemble_dir, data, out, greedy=greedy, force=force, device=device)
    console.print(f"soup of {', '.join(result['ingredients'])}: test accuracy {result['accuracy']:.4f} → "
                  f"[bold]{out}[/]", highlight=False)
