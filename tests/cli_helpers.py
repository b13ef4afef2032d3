"""What the CLI tests share: invoking ``pat`` in-process and reading its one error line."""

from __future__ import annotations

from click.testing import CliRunner

from pat.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(result) -> str:
    """The single ``Error: ...`` line of a refused command (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]
