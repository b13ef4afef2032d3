from __future__ import annotations

import subprocess
import sys

import pat


def test_every_public_name_resolves():
    for name in pat.__all__:
        assert getattr(pat, name) is not None, name


def test_split_is_the_function_even_after_its_module_is_imported():
    import pat.children  # noqa: F401
    import pat.tuner  # noqa: F401

    assert callable(pat.split) and pat.split.__module__ == "pat.children"


def test_cli_help_does_not_import_torch():
    code = "import sys; from pat.cli import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
