"""Every code block of README.md and docs/*.md runs, or the table below says why it cannot.

Blocks are found by their fences and named by (page, index); ``BLOCKS`` holds one entry per
block, so a new block without an entry, or a block that moved, fails
:func:`test_every_block_is_in_the_table` instead of going untested (decision 42).

- python: the block runs as written in a subprocess, in a fresh temp directory, importing this
  checkout. ``given`` is code run first that defines what the page assumes (its ``parent``,
  ``model``); ``files`` are fixtures put in the directory first (``parent.pt``, ``runs/kids``).
- shell: each ``pat ...`` line runs in-process through click, in order, in one temp directory.
  ``extra`` appends options to a command (click keeps the last value of an option, so
  ``--epochs 1`` after the page's ``--epochs 10`` shortens the run without editing the line).
  Optional parts in ``[...]`` are dropped when running and parsed (not run) with them in.
  A line on a dataset or weights that must be downloaded must exit 2 with one line on stderr
  naming ``--data-dir`` or the weights: that proves its options parse. ``torchrun`` and
  ``make`` lines are not run; what they name is checked instead (``SKIPPED_LINES``).
- other blocks (yaml, json, printed output) are checked against what the code does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).parents[1]
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
# a dataset or weights fetched from the network: such a line cannot run offline
DOWNLOADS = re.compile(r"--dataset (cifar10|cifar100|svhn|mnist|fashion-mnist)\b|--pretrained tv:")
# lines that are not pat commands, each with why it is not run here
SKIPPED_LINES = {
    "torchrun": "needs several processes (tests/test_distributed.py runs torchrun); its pat options are parsed",
    "make": "installs a virtualenv; the target is checked to exist in the Makefile",
}


def blocks(page: str) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of ``page``, in order."""
    return FENCE.findall((ROOT / page).read_text())


@dataclass(frozen=True)
class Case:
    kind: str  # python, shell, skip or check
    starts: str  # the block's first line starts with this: a moved block fails here, not silently elsewhere
    given: str = ""
    files: tuple[str, ...] = ()
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)
    offline: bool = False  # python: must fail with pat's one-line --data-dir error
    slow: bool = False
    reason: str = ""  # skip: why it is not run
    check: Callable[[str, Path], None] | None = None


# --- checks of blocks that are not commands -------------------------------------------------


def _check_make_targets(text: str, tmp: Path) -> None:
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
    for line in text.replace("\\\n", " ").splitlines():  # a line continued with a backslash is one
        words = shlex.split(line, comments=True)
        assert words[0] == "make" and words[1] in targets, f"{line!r}: no such Makefile target"


def _check_offline_error(text: str, tmp: Path) -> None:
    """docs/data.md quotes the offline error: it is what pat prints, joined onto one line."""
    from pat.cli import cli

    result = CliRunner().invoke(cli, ["train", "--dataset", "cifar10", "--out", "p.pt"])
    assert result.exit_code == 2, result.output
    quoted = "Error: " + " ".join(text.split())
    assert result.stderr.strip().startswith(quoted), (result.stderr, quoted)


def _check_train_header(text: str, tmp: Path) -> None:
    """docs/training.md's first line of a run: the same words as pat train prints."""
    from pat.cli import cli

    result = CliRunner().invoke(cli, ["train", "--model", "lenet-s", "--dataset", "digits", "--out", "p.pt"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == text.strip()


def _check_collapse_warning(text: str, tmp: Path) -> None:
    """docs/training.md's collapse warning: what pat train prints for the run it describes."""
    from pat.cli.train import collapse_warning

    restored = {"epoch": 17, "val_loss": 0.55, "val_acc": 0.803,
                "last": {"epoch": 48, "val_loss": 2.3026, "val_acc": 0.1}}
    assert collapse_warning(restored) == text.strip()


def _check_json(text: str, tmp: Path) -> None:
    # a fragment ("members": [...]) is a member of the manifest object
    json.loads(text if text.lstrip().startswith("{") else "{" + text + "}")


def _check_manifest_example(text: str, tmp: Path) -> None:
    """docs/file-formats.md's manifest has the keys a real one has (a split on digits)."""
    _check_json(text, tmp)
    doc = json.loads(text)
    real = json.loads((tmp / "runs/kids/ensemble.json").read_text())
    assert set(doc) - {"selection"} == set(real) - {"selection"}, (sorted(doc), sorted(real))
    doc_member, real_member = doc["members"][0], real["members"][0]
    assert set(doc_member) == set(real_member), (sorted(doc_member), sorted(real_member))
    assert set(doc_member["recipe"]) == set(real_member["recipe"])


def _check_directory_listing(text: str, tmp: Path) -> None:
    """docs/file-formats.md's listing names what a split + tune + eval directory holds."""
    listed = {line.split()[0].rstrip("/") for line in text.splitlines()[1:] if line.strip()}
    real = {p.name for p in (tmp / "runs/kids").iterdir()}
    real = {re.sub(r"^child-\d+\.pt$", "child-0.pt", n) for n in real}
    real = {re.sub(r"^logits-.*\.pt$", "logits-test.pt", n) for n in real}
    assert real <= listed, sorted(real - listed)


def _check_run_config(text: str, tmp: Path) -> None:
    """A yaml block is a RunConfig that loads (a budget one allocates as docs/tuning.md says)."""
    import yaml

    from pat.config import RunConfig, from_dict

    config = from_dict(RunConfig, yaml.safe_load(text))
    assert config.parent.model


def _check_budget_line(text: str, tmp: Path) -> None:
    """An allocation line docs/tuning.md prints is what allocate_budget says for the yaml before it."""
    import yaml

    from pat.config import RunConfig, from_dict
    from pat.data import load_dataset
    from pat.pipeline import resolve_budget

    found = blocks("docs/tuning.md")
    here = next(i for i, (_, t) in enumerate(found) if t == text)
    yaml_block = next(t for lang, t in reversed(found[:here]) if lang == "yaml" and "budget:" in t)
    _, allocation = resolve_budget(from_dict(RunConfig, yaml.safe_load(yaml_block)), load_dataset("digits"))
    assert allocation is not None and allocation.describe() == text.strip()


def _check_run_output(text: str, tmp: Path) -> None:
    """docs/file-formats.md's metrics.json of pat run: the keys a real (budgeted) run writes."""
    from pat.cli import cli

    (tmp / "budget.yaml").write_text("parent: {model: lenet-s, lr: 0.05, data: {dataset: digits}}\n"
                                     "split: {children: 2}\nbudget: {epochs: 4}\nout: run\n")
    result = CliRunner().invoke(cli, ["run", "budget.yaml"])
    assert result.exit_code == 0, (result.output, result.exception)
    real = json.loads((tmp / "run/metrics.json").read_text())
    keys = _keys_by_depth(text)
    assert keys[1] == set(real), (sorted(keys[1]), sorted(real))
    def documented(key: str, until: str) -> set[str]:
        return set(re.findall(r'"(\w+)":', text[text.index(f'"{key}"') + len(key) + 3:text.index(f'"{until}"')]))

    assert documented("allocation", "baseline_trend") == set(real["allocation"]), sorted(real["allocation"])
    assert documented("validation", "allocation") == set(real["validation"]), sorted(real["validation"])
    assert real["baseline_trend"] is None  # no baseline in this run; the sketch's keys are baseline_trend()'s
    from pat.comparison import baseline_trend

    sketch = set(re.findall(r'"(\w+)":', text[text.index('"baseline_trend"') + 17:]))
    assert sketch == set(baseline_trend([{"epoch": 1, "val_loss": 0.5}]))


def _check_trend_note(text: str, tmp: Path) -> None:
    """docs/tuning.md's note: what pat run prints when its independent model was still improving."""
    from pat.cli.children import _trend_line
    from pat.cli.render import console

    with console.capture() as captured:
        _trend_line({"best_epoch": 95, "epochs": 96, "still_improving": True})
    assert captured.get().strip() == text.strip()


def _check_demo_summary(text: str, tmp: Path) -> None:
    """docs/tuning.md's summary line of pat demo: the shape of what it prints (figures aside)."""
    from pat.cli.children import _render_seeds
    from pat.cli.render import console
    from pat.pipeline import RunResult

    def result(acc: float) -> RunResult:
        rows = [{"name": name, "accuracy": acc - k / 10, "nll": 0.1, "nll_ts": 0.1 + k / 10, "ece": 0.01}
                for k, name in enumerate(("parent", "ensemble (2)", "independent (48 ep)"))]
        return RunResult(out="x", rows=rows, diversity={}, seconds=1.0)

    width, console.width = console.width, 400  # one line, as on a wide terminal
    try:
        with console.capture() as captured:
            _render_seeds([result(0.9), result(0.95), result(0.97), result(0.91), result(0.99)])
    finally:
        console.width = width
    line = next(s for s in captured.get().splitlines() if "− independent" in s)
    shape = text.strip().removesuffix("...")
    assert re.sub(r"\d", "#", line).startswith(re.sub(r"\d", "#", shape)), (line, shape)


def _keys_by_depth(text: str) -> dict[int, set[str]]:
    """The ``"key":`` names of a JSON-like sketch by brace depth (the sketch is not JSON)."""
    keys: dict[int, set[str]] = {}
    depth = 0
    for m in re.finditer(r'[{}]|"(\w+)":', text):
        if m.group(0) == "{":
            depth += 1
        elif m.group(0) == "}":
            depth -= 1
        else:
            keys.setdefault(depth, set()).add(m.group(1))
    return keys


# --- the table: one entry per block, in page order ------------------------------------------

BLOCKS: dict[tuple[str, int], Case] = {
    ("README.md", 0): Case("check", "make demo", check=_check_make_targets),
    ("README.md", 1): Case("shell", "pat train", files=("pool", "config.yaml"), slow=True,
                           extra={"train": ("--epochs", "1"), "tune": ("--epochs", "1")}),
    ("README.md", 2): Case("shell", "pat pool", files=("member.pt",)),
    ("README.md", 3): Case("python", "import pat", slow=True),
    ("docs/benchmarks.md", 0): Case("skip", "benchmarks/gpu_check.sh",
                                    reason="needs a CUDA device and wheel files (tests/test_gpu_check.py covers the script)"),
    ("docs/checkpoint-format.md", 0): Case("python", "from pat.engine.checkpoint", files=("parent.pt",)),
    ("docs/data.md", 0): Case("python", "import torch"),
    ("docs/data.md", 1): Case("check", "dataset 'cifar10'", check=_check_offline_error),
    ("docs/ensemble.md", 0): Case("python", "from pat.data import", files=("runs/kids",)),
    ("docs/ensemble.md", 1): Case("shell", "pat calibrate", files=("runs/kids",)),
    ("docs/ensemble.md", 2): Case("python", "T = pat.fit_temperature", files=("runs/kids",),
                                  given="import pat, torch\n"
                                        "val_logits, val_labels = torch.randn(64, 10), torch.randint(0, 10, (64,))\n"
                                        "test_logits, x = torch.randn(16, 10), torch.rand(4, 1, 32, 32)\n"),
    ("docs/file-formats.md", 0): Case("check", "children/", files=("runs/kids",), check=_check_directory_listing),
    ("docs/file-formats.md", 1): Case("check", "{", files=("runs/kids",), check=_check_manifest_example),
    ("docs/file-formats.md", 2): Case("check", '"members": [', check=_check_json),
    ("docs/file-formats.md", 3): Case("check", '{"test": [', check=_check_run_output),
    ("docs/masks.md", 0): Case("python", "import pat", given="import pat\nparent = pat.create_model('lenet-s')\n"),
    ("docs/masks.md", 1): Case("python", "import torch"),
    ("docs/masks.md", 2): Case("shell", "pat split", files=("parent.pt",)),
    ("docs/models.md", 0): Case("python", "from pat.models import"),
    ("docs/models.md", 1): Case("python", "from torch import nn"),
    ("docs/producers.md", 0): Case("shell", "pat pool", files=("parent.pt", "member.pt"),
                                   extra={"pool": ("--epochs", "1", "--policies", "one-cycle", "--lrs", "0.05"),
                                          "starsse": ("--members", "2", "--epochs", "1", "--cycle-epochs", "1"),
                                          "sharpbalance": ("--members", "2", "--initial-epochs", "1", "--epochs",
                                                           "2")}),
    ("docs/training.md", 0): Case("shell", "pat train", extra={"train": ("--epochs", "1")}),
    ("docs/training.md", 1): Case("check", "pat train lenet-s on digits", check=_check_train_header),
    ("docs/training.md", 2): Case("shell", "pat train --model tv:resnet18 --pretrained"),
    ("docs/training.md", 3): Case("check", "warning: the model collapsed", check=_check_collapse_warning),
    ("docs/training.md", 4): Case("python", "from pat.config", offline=True),
    ("docs/tuning.md", 0): Case("shell", "pat split", files=("parent.pt",), extra={"tune": ("--epochs", "1")}),
    ("docs/tuning.md", 1): Case("python", "import pat", slow=True,
                                given="import pat\nmodel = pat.create_model('lenet-s', in_channels=1)\n"),
    ("docs/tuning.md", 2): Case("shell", "pat split", files=("parent.pt",), extra={"tune": ("--epochs", "1")}),
    ("docs/tuning.md", 3): Case("python", "import copy"),
    ("docs/tuning.md", 4): Case("check", "parent: {model: resnet20", check=_check_run_config),
    ("docs/tuning.md", 5): Case("check", "parent: {model: lenet-s", check=_check_run_config),
    ("docs/tuning.md", 6): Case("check", "budget 48 epochs", check=_check_budget_line),
    ("docs/tuning.md", 7): Case("check", "note: the independent model", check=_check_trend_note),
    ("docs/tuning.md", 8): Case("check", "parent: {model: lenet-s", check=_check_run_config),
    ("docs/tuning.md", 9): Case("check", "budget 48 epochs", check=_check_budget_line),
    ("docs/tuning.md", 10): Case("check", "ensemble (2) − independent", check=_check_demo_summary),
    ("docs/tuning.md", 11): Case("shell", "torchrun"),
    ("docs/tuning.md", 12): Case("shell", "torchrun"),
}


def test_every_block_is_in_the_table():
    found = {(page, i): text for page in PAGES for i, (_, text) in enumerate(blocks(page))}
    assert sorted(found) == sorted(BLOCKS), (
        f"blocks without an entry: {sorted(set(found) - set(BLOCKS))}; "
        f"entries without a block: {sorted(set(BLOCKS) - set(found))}")
    for key, text in found.items():
        assert text.lstrip().startswith(BLOCKS[key].starts), f"{key} now starts {text.splitlines()[0]!r}"


# --- fixtures: made once, copied into each block's directory --------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory, digits_parent) -> Path:
    """parent.pt / member.pt (a LeNet-S on digits), runs/kids (4 children tuned 1 epoch), pool (3 members),
    config.yaml (a 1-epoch run on digits): each small, so that a page's commands run in seconds."""
    from pat.cli import cli

    root = tmp_path_factory.mktemp("made")
    shutil.copy(digits_parent, root / "parent.pt")
    shutil.copy(digits_parent, root / "member.pt")
    (root / "config.yaml").write_text(
        "parent: {model: lenet-s, epochs: 1, lr: 0.05, data: {dataset: digits}}\n"
        "split: {children: 2}\ntune: {epochs: 1}\nout: runs/tiny\n")
    old = os.getcwd()
    os.chdir(root)
    try:
        for args in (["split", "--parent", "parent.pt", "--children", "4", "--out", "runs/kids"],
                     ["tune", "runs/kids", "--epochs", "1"],
                     ["eval", "runs/kids"],
                     ["pool", "--model", "lenet-s", "--dataset", "digits", "--epochs", "1", "--policies",
                      "one-cycle", "--lrs", "0.02,0.05,0.1", "--out", "pool"]):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 0, (args, result.output)
    finally:
        os.chdir(old)
    return root


def _put(made: Path, names: tuple[str, ...], tmp: Path) -> None:
    for name in names:
        src, dst = made / name, tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)


def _params():
    for (page, i), case in BLOCKS.items():
        marks = [pytest.mark.slow] if case.slow else []
        yield pytest.param(page, i, marks=marks, id=f"{page}:{i}")


@pytest.mark.parametrize("page,index", list(_params()))
def test_block(page, index, tmp_path, made, monkeypatch):
    case = BLOCKS[(page, index)]
    text = blocks(page)[index][1]
    if case.kind == "skip":
        pytest.skip(f"{page} block {index}: {case.reason}")
    _put(made, case.files, tmp_path)
    monkeypatch.chdir(tmp_path)
    if case.kind == "python":
        _run_python(case, text, tmp_path)
    elif case.kind == "shell":
        _run_shell(case, text)
    else:
        assert case.check is not None
        case.check(text, tmp_path)


def _run_python(case: Case, text: str, tmp: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", case.given + text], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=300)
    if case.offline:  # an uncaught PatError: its message is the last line, naming --data-dir
        assert proc.returncode != 0, proc.stdout
        last = proc.stderr.strip().splitlines()[-1]
        assert re.match(r"pat\.errors\.\w+: .*--data-dir", last), proc.stderr[-2000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


def _run_shell(case: Case, text: str) -> None:
    from pat.cli import cli

    for line in text.replace("\\\n", " ").splitlines():  # a line continued with a backslash is one
        words = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
        if not words:
            continue
        if words[0] != "pat":
            assert words[0] in SKIPPED_LINES, f"{line!r}: not a pat command and not in SKIPPED_LINES"
            if words[0] == "torchrun":  # what follows -m pat must still parse
                _parse(cli, words[words.index("pat") + 1:])
            continue
        _parse(cli, words[1:])  # with the optional [...] parts in
        args = shlex.split(re.sub(r"\[[^\]]*\]", " ", line), comments=True)[1:]
        if DOWNLOADS.search(line):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 2, (line, result.output)
            err = result.stderr.strip().splitlines()
            assert len(err) == 1 and re.search(r"--data-dir|weights", err[0]), (line, result.stderr)
            continue
        args += case.extra.get(args[0], ())
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, (line, result.output, result.exception)


def _parse(cli, args: list[str]) -> None:
    """Parse a command line the way click would, without running it.

    The command's context has the group's as parent, as when run: click caches a command's
    help option from the first context it sees, and one without the group's ``-h`` would
    change ``pat X -h`` (and docs/cli.md) for the rest of the session.
    """
    group = cli.make_context("pat", [args[0]], resilient_parsing=True)
    with cli.commands[args[0]].make_context(args[0], list(args[1:]), parent=group):
        pass
