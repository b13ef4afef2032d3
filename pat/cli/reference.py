"""docs/cli.md, generated from click's own help so that it cannot drift from the code.

``python -m pat.cli.reference > docs/cli.md`` rewrites the page; tests/test_cli_reference.py
fails, naming the command, when the committed page differs from :func:`render`.
"""

from __future__ import annotations

import inspect

import click

__all__ = ["render", "render_command"]

HEADER = """# Command-line reference

Generated from the commands' own help by `python -m pat.cli.reference > docs/cli.md`; do not
edit by hand (tests/test_cli_reference.py fails when this page and the code differ).
`pat COMMAND --help` prints the same. Bad input is one line naming the argument and the value,
exit code 2.
"""


def _cell(text: str) -> str:
    """One Markdown table cell: no line breaks, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _paragraphs(text: str) -> str:
    r"""A docstring's paragraphs, each on one line (click's ``\b`` no-rewrap marker dropped)."""
    blocks = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(b.replace("\b", "").split()) for b in blocks if b.strip())


def render_command(group: click.Group, name: str) -> str:
    """The section of one command: its help, usage line and a table of its options."""
    parent = click.Context(group, info_name="pat", **group.context_settings)
    command = group.commands[name]
    ctx = click.Context(command, info_name=name, parent=parent)
    usage = " ".join(["pat", name, *command.collect_usage_pieces(ctx)])
    # usage inline, not fenced: a fenced block on a docs page is one tests/test_docs.py must run
    lines = [f"## pat {name}", "", _paragraphs(command.help or ""), "", f"Usage: `{usage}`", ""]
    rows = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is not None:
            opts, text = record
            if isinstance(param, click.Argument):  # click gives arguments no help text
                text = "argument" + (" (required)" if param.required else " (optional)")
            rows.append((opts, text))
    if rows:
        lines += ["| option | description |", "|---|---|"]
        lines += [f"| `{_cell(opts)}` | {_cell(text)} |" for opts, text in rows]
        lines.append("")
    return "\n".join(lines)


def render(group: click.Group | None = None) -> str:
    """The whole page: the group's help, then every command in alphabetical order."""
    if group is None:
        from pat.cli import cli as group
    parts = [HEADER, _paragraphs(group.help or ""), ""]
    parts += [render_command(group, name) for name in sorted(group.commands)]
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    click.echo(render(), nl=False)
