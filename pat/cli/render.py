"""Rich rendering: progress bars fed by training callbacks, and result tables."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pat.engine.callbacks import Callback, FitState

console = Console()
err_console = Console(stderr=True)

__all__ = ["console", "err_console", "EpochProgress", "metrics_table", "fmt", "human_flops"]


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell's text: floats to ``digits`` decimals, None as a dash."""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "—" if value is None else str(value)


class EpochProgress(Callback):
    """A bar over all training steps plus one line per finished epoch."""

    def __init__(self, title: str = "train", *, console: Console = err_console) -> None:
        self.title, self.console = title, console
        self.progress: Progress | None = None

    def on_fit_start(self, state: FitState) -> None:
        """Start the bar, resumed at the step and epoch ``state`` starts from."""
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}"), TimeElapsedColumn(),
            console=self.console, transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.title, total=state.total_steps or None,
                                           completed=state.step, epoch=state.epoch + 1)

    def on_step_end(self, state: FitState) -> None:
        """Advance the bar to the current step."""
        self.progress.update(self.task, completed=state.step, epoch=state.epoch + 1)

    def on_epoch_end(self, state: FitState) -> None:
        """Print the epoch's line: loss, accuracy, validation accuracy, LR and time."""
        m = state.metrics
        parts = [f"epoch {m['epoch']}/{state.epochs}", f"loss {m['train_loss']:.3f}",
                 f"acc {m['train_acc']:.3f}"]
        if "val_acc" in m:
            parts.append(f"val {m['val_acc']:.3f}")
        parts += [f"lr {m['lr']:.1e}", f"{m['time']:.1f}s"]
        self.progress.console.print("  ".join(parts), highlight=False)

    def on_fit_end(self, state: FitState) -> None:
        """Remove the bar (it is transient; the epoch lines stay)."""
        if self.progress is not None:
            self.progress.stop()


def human_flops(flops: float | None) -> str:
    """``1.2 TFLOP``-style text for a FLOP count."""
    if flops is None:
        return "—"
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} FLOP"


def metrics_table(title: str, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Table:
    """A table with one row per mapping; missing entries show as a dash."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col in ("name", "member", "key") else "right")
    for row in rows:
        table.add_row(*(fmt(row.get(col)) for col in columns))
    return table
