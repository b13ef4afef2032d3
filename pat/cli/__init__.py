"""The ``pat`` command line: a thin shell over the Python API (the only place using click/rich).

Every command parses its options, builds a config, calls one ``pat`` function and renders the
result. A :class:`pat.PatError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import click

from pat import __version__
from pat.errors import PatError

__all__ = ["main", "cli"]


class UserError(click.ClickException):
    """A :class:`PatError` shown the click way: ``Error: <message>``, exit code 2."""

    exit_code = 2


class PatGroup(click.Group):
    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except PatError as e:
            raise UserError(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished work is kept; run the same command to continue.", err=True)
            sys.exit(130)


@click.group(cls=PatGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="pat")
def cli() -> None:
    """pat: low-cost deep ensembles by pruning.

    Train one parent, split it into differently pruned children, tune each briefly,
    and average their predictions.
    """


def _register() -> None:
    from pat.cli import children, ensemble, producers, train

    for command in (train.train, children.split, children.tune, children.run, children.demo,
                    ensemble.eval_, ensemble.calibrate, ensemble.select, ensemble.soup, producers.pool,
                    producers.starsse, producers.sharpbalance, producers.sharpness, train.info):
        cli.add_command(command)


_register()


def main() -> None:
    """Run the ``pat`` command line (the console-script entry point)."""
    cli(prog_name="pat")
