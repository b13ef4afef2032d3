"""``pat eval``, ``pat select`` and ``pat soup``: members of any producer, one module."""

from __future__ import annotations

import click

from pat.cli.options import data_options, ensemble_data, force_option, lock_options, override_option
from pat.cli.render import console, fmt, metrics_table

METRICS = ["accuracy", "nll", "ece", "brier"]


def _data(ensemble_dir: str, dataset, data_dir, val_fraction, data_seed, override_data: bool):
    """The data the manifest records, with what the command line gives (conflicts refused)."""
    return ensemble_data(ensemble_dir, dataset=dataset, data_dir=data_dir, val_fraction=val_fraction,
                         data_seed=data_seed, override=override_data)[1]


def ensemble_data_options(func):
    """Data options defaulting to the directory's record, --override-data, --device."""
    func = click.option("--device", default="auto")(func)
    func = override_option(func)
    return data_options(func, from_manifest=True, batch_size=False)


@click.command("eval")
@click.argument("ensemble_dir", type=click.Path())
@ensemble_data_options
@click.option("--split", type=click.Choice(["test", "val"]), default="test")
@click.option("--no-calibration", is_flag=True, help="Ignore the temperatures of pat calibrate (raw metrics only).")
@click.option("--dee", "dee_dir", default=None, type=click.Path(file_okay=False),
              help="Directory of independently trained models: report the Deep Ensemble Equivalent.")
@click.option("--ood", "ood_name", default=None, help="Out-of-distribution dataset (same image shape; "
              "synthetic adapts to it): AUROC, AUPR, FPR@95 per score.")
@click.option("--corruptions", is_flag=True, help="Also evaluate 8 corruptions at severities 1-5.")
@click.option("--plot", "plot_dir", default=None, type=click.Path(file_okay=False),
              help="Write reliability, risk-coverage, accuracy-vs-size and disagreement PNGs here.")
def eval_(ensemble_dir, dataset, data_dir, val_fraction, data_seed, override_data, device, split, no_calibration,
          dee_dir,
          ood_name, corruptions, plot_dir) -> None:
    """Evaluate members and ensemble (metrics.json); temperature-scaled when calibrated."""
    from pat.ensemble.report import evaluate_directory
    from pat.io import ensure_folder_writable

    if plot_dir is not None:  # before the members run, not after
        ensure_folder_writable(plot_dir, argument="--plot")
    values, data = ensemble_data(ensemble_dir, dataset=dataset, data_dir=data_dir, val_fraction=val_fraction,
                                 data_seed=data_seed, override=override_data)
    data_dir, data_seed = values["data_dir"], values["seed"]
    ood = _ood_data(ood_name, data, data_dir, data_seed) if ood_name else None
    report = evaluate_directory(ensemble_dir, data, split=split, corruptions=corruptions, plot_dir=plot_dir,
                                device=device, data_dir=data_dir, calibration=not no_calibration,
                                dee=dee_dir, ood=ood)
    console.print(metrics_table(f"{ensemble_dir} — {data.name} {split}", _rows(report), _columns(report)))
    d = report["all"]["diversity"]
    console.print(f"disagreement {fmt(d['disagreement'])}  disagreement/error {fmt(d['disagreement_error_ratio'])}"
                  f"  prediction variance {fmt(d['prediction_variance'])}"
                  f"  focal diversity ({d['focal_measure']}) {fmt(d['focal_diversity'])}", highlight=False)
    if "calibrated" not in report and not no_calibration:
        console.print(f"raw metrics: run [bold]pat calibrate {ensemble_dir}[/] for temperature-scaled ones "
                      "(the fair way to compare NLL and ECE)", highlight=False)
    _print_cost(report["cost"])
    if "dee" in report:
        dee = report["dee"]
        parts = [f"{k}: {dee[k]['bound']}{dee[k]['dee']:.2f} (calibrated NLL {dee[k]['calibrated_nll']:.4f})"
                 for k in ("all", "selection") if k in dee]
        curve = ", ".join(f"{v:.4f}" for v in dee["reference_curve"])
        console.print(f"Deep Ensemble Equivalent vs {dee['reference']} — {'; '.join(parts)}; "
                      f"reference calibrated NLL by size: {curve}", highlight=False)
    if "ood" in report:
        o = report["ood"]
        rows = [{"score": k, **v} for k, v in o["ensemble"].items()]
        console.print(metrics_table(f"OOD: {data.name} test vs {o['dataset']} ({o['size']} images), ensemble",
                                    rows, ["score", "auroc", "aupr_in", "aupr_out", "fpr95"]))
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


def _ood_data(name: str, data, data_dir: str, data_seed: int):
    """The OOD dataset; builders with image-shape options (synthetic) take the ensemble's shape."""
    from pat.data import load_dataset_like

    return load_dataset_like(name, data, data_dir=data_dir, seed=data_seed + 1)


def _columns(report) -> list[str]:
    extra = ["nll_ts", "ece_ts", "T"] if "calibrated" in report else []
    return ["name", *METRICS, *extra, "aurc"]


def _rows(report) -> list[dict]:
    cal, sel, aurc = report.get("calibrated"), report["selective"], report["selective"]
    def after(metrics, t):
        return {} if metrics is None else {"nll_ts": metrics["nll"], "ece_ts": metrics["ece"], "T": t}
    rows = []
    for i, (n, m) in enumerate(zip(report["names"], report["all"]["members"], strict=True)):
        rows.append({"name": n, **m, "aurc": aurc["members"][i],
                     **(after(cal["members"][i], cal["temperatures"]["members"][i]) if cal else {})})
    rows.append({"name": f"ensemble (all {len(rows)})", **report["all"]["ensemble"], "aurc": sel["ensemble"],
                 **(after(cal["ensemble"], cal["temperatures"]["ensemble"]) if cal else {})})
    if "selection" in report:
        team = report["selection"]
        rows.append({"name": f"{team['method']} team ({len(team['selected'])})", **team["ensemble"],
                     **(after(cal.get("selection"), cal["temperatures"].get("selection")) if cal else {})})
    return rows


def _print_cost(cost) -> None:
    from pat.cli.render import human_flops

    total = cost["total"]
    parent = cost.get("parent")
    text = (f"training cost: {total['steps']} optimizer steps, {total['samples']} samples, "
            f"{human_flops(total['flops'])}, {total['seconds']:.1f} s"
            + (f" (parent {human_flops(parent['flops'])} of it)" if parent else "")
            + (f"; inference {total['inference_macs'] / 1e6:.2f} M MACs per sample for the ensemble"
               if total.get("inference_macs") else "")
            + ("" if cost.get("complete", True) else " — incomplete: some members record no cost"))
    console.print(text, highlight=False)


@click.command()
@click.argument("ensemble_dir", type=click.Path())
@ensemble_data_options
@lock_options("ensemble_dir")
def calibrate(ensemble_dir, dataset, data_dir, val_fraction, data_seed, override_data, device) -> None:
    """Fit temperatures (members, ensemble, team) on the validation split."""
    from pat.ensemble.report import calibrate_directory

    data = _data(ensemble_dir, dataset, data_dir, val_fraction, data_seed, override_data)
    record = calibrate_directory(ensemble_dir, data, device=device)
    rows = [{"name": n, "T": t} for n, t in record["members"].items()]
    rows.append({"name": "ensemble", "T": record["ensemble"]})
    if record["selection"]:
        rows.append({"name": "team", "T": record["selection"]["temperature"]})
    console.print(metrics_table(f"temperatures fitted on {data.name} val ({record['val_size']} samples)",
                                rows, ["name", "T"]))
    v = record["val_nll"]
    console.print(f"ensemble validation NLL {v['raw']:.4f} → {v['calibrated']:.4f}; stored in "
                  f"{ensemble_dir}/ensemble.json (pat eval uses them)", highlight=False)


@click.command()
@click.argument("ensemble_dir", type=click.Path())
@click.option("--method", default="greedy", help="all, top-k, random, brute-force, greedy, focal.")
@click.option("--size", default=None, type=int,
              help="Team size: required for top-k, random and focal; the most members greedy and brute-force "
                   "may keep [default: all of them].")
@click.option("--metric", default=None, type=click.Choice(["nll", "accuracy"]), help="What greedy/top-k/brute-force optimise.")
@click.option("--measure", default=None, help="Focal diversity measure: generalized, kw, disagreement, kappa, q.")
@click.option("--seed", default=None, type=int, help="Seed of the random selector.")
@ensemble_data_options
@lock_options("ensemble_dir")
def select(ensemble_dir, method, size, metric, measure, seed, dataset, data_dir, val_fraction, data_seed,
           override_data, device) -> None:
    """Choose a team on the validation split."""
    from pat.ensemble.report import select_directory

    options = {k: v for k, v in {"metric": metric, "measure": measure, "seed": seed}.items() if v is not None}
    data = _data(ensemble_dir, dataset, data_dir, val_fraction, data_seed, override_data)
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
def soup(ensemble_dir, greedy, out, force, dataset, data_dir, val_fraction, data_seed, override_data, device) -> None:
    """Average members' weights into one model."""
    from pat.ensemble.report import soup_directory

    data = _data(ensemble_dir, dataset, data_dir, val_fraction, data_seed, override_data)
    result = soup_directory(ensemble_dir, data, out, greedy=greedy, force=force, device=device)
    console.print(f"soup of {', '.join(result['ingredients'])}: test accuracy {result['accuracy']:.4f} → "
                  f"[bold]{out}[/]", highlight=False)
