"""docs/cli.md is what pat.cli.reference generates from click's help: it cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import click

from pat.cli import cli
from pat.cli.reference import render, render_command

PAGE = Path(__file__).parents[1] / "docs" / "cli.md"


def _sections(text: str) -> dict[str, str]:
    """Command name -> its section ("" holds the page's head)."""
    parts = re.split(r"^## pat (\S+)\n", text, flags=re.M)
    return {"": parts[0], **dict(zip(parts[1::2], parts[2::2], strict=True))}


def test_docs_cli_md_is_what_the_code_generates():
    committed, generated = _sections(PAGE.read_text()), _sections(render())
    stale = sorted(name or "(page head)" for name in committed.keys() | generated.keys()
                   if committed.get(name) != generated.get(name))
    assert not stale, (f"docs/cli.md differs from the code for: {', '.join(stale)}; "
                       "regenerate it with `python -m pat.cli.reference > docs/cli.md`")


def test_every_command_and_option_is_on_the_page():
    page = PAGE.read_text()
    for name, command in cli.commands.items():
        assert f"## pat {name}\n" in page, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert f"`{param.opts[0]}" in page.split(f"## pat {name}\n")[1].split("\n## ")[0], (name, param.opts)


def test_a_changed_option_shows_in_the_section_of_its_command():
    @click.group()
    def group():
        """A group."""

    @group.command()
    @click.option("--size", default=3, show_default=True, help="How many | which.")
    @click.argument("path")
    def one(size, path):
        """Do one thing.

        Second paragraph,
        wrapped.
        """

    section = render_command(group, "one")
    assert "Usage: `pat one [OPTIONS] PATH`" in section
    assert "| `--size INTEGER` | How many \\| which. [default: 3] |" in section
    assert "| `PATH` | argument (required) |" in section
    assert "Do one thing.\n\nSecond paragraph, wrapped." in section
