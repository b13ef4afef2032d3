"""A memory and time bound around work whose cost pat cannot predict (tracing, slimming).

torch-pruning's graph search can recurse without end on some architectures (torchvision's
Swin grew to 24 GB before the kernel killed it). :func:`bounded` watches the process's
resident memory and the clock from a thread and, past either limit, interrupts the work
and raises one :class:`~pat.errors.PatError` instead.

The limits are :data:`LIMITS` (change its fields to raise them):

* memory: ``memory_factor`` × the model's parameter bytes + ``memory_floor`` for
  activations and the graph itself, counted as growth of the resident set from the start;
* time: ``seconds`` of wall clock; a block inside another ends by the outer one's
  deadline too (``pat.split`` bounds its whole choice of channel groups this way).

Only the main thread can be interrupted; elsewhere the work runs unbounded.
"""

from __future__ import annotations

import _thread
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from pat.errors import PatError

__all__ = ["Limits", "LIMITS", "OutOfBounds", "bounded", "memory_limit", "time_limit"]


@dataclass
class Limits:
    """The bounds of :func:`bounded` (see the module doc); :data:`LIMITS` is the one in use."""

    memory_factor: float = 4.0
    memory_floor: int = 1 << 30  # bytes
    seconds: float = 120.0
    # a block traced on its own (pat.masks.scopes) gets its own, smaller bounds: blocks are
    # small, and a block that cannot be grouped should fail fast so its parts can be tried
    block_memory_floor: int = 64 << 20
    block_seconds: float = 2.0


LIMITS = Limits()
_DEADLINES: list[float] = []  # of the enclosing bounded blocks: an inner one ends by them too


def memory_limit(model: nn.Module, limits: Limits | None = None, *, block: bool = False) -> int:
    """Bytes of growth allowed while working on ``model`` (a block of a model: ``block``)."""
    limits = limits or LIMITS
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = limits.block_memory_floor if block else limits.memory_floor
    return int(limits.memory_factor * nbytes + floor)


def time_limit(limits: Limits | None = None, *, block: bool = False) -> float:
    """Seconds allowed for one step of work on a model (a block of a model: ``block``)."""
    limits = limits or LIMITS
    return limits.block_seconds if block else limits.seconds


def _rss() -> int | None:
    """Resident set size in bytes (Linux), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _vm_size() -> int | None:
    """Virtual memory size in bytes (Linux), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def _address_space(max_bytes: int) -> Iterator[None]:
    """Cap the address space at its current size + ``max_bytes`` while the block runs.

    One huge allocation never returns to the interpreter, so the watcher thread cannot
    interrupt it; under the cap it fails at once with a MemoryError instead of waking the
    kernel's OOM killer.
    """
    vm = _vm_size()
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError):
        vm = None
    if vm is None:
        yield
        return
    cap = vm + max_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY and soft <= cap:
        yield  # already tighter
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextmanager
def _interruptible() -> Iterator[None]:
    """Let the watcher's ``interrupt_main`` through while the block runs.

    ``_thread.interrupt_main`` does nothing while SIGINT is ignored, and a process started in
    the background by a non-interactive shell (``pat split ... &`` in a script) starts so: the
    bound would never fire and the work would run on. No terminal sends such a process a
    Ctrl-C, so Python's own handler is put in for the block and the old disposition restored.
    """
    previous = signal.getsignal(signal.SIGINT)
    if callable(previous):
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class OutOfBounds(PatError):
    """Work stopped at its bound; ``outer`` when it was an enclosing block's deadline."""

    def __init__(self, message: str, *, outer: bool = False) -> None:
        super().__init__(message)
        self.outer = outer


@contextmanager
def bounded(
    what: str, *, max_bytes: int, max_seconds: float, poll: float = 0.05
) -> Iterator[None]:
    """Run the block; raise ``PatError`` naming ``what`` if it outgrows either limit.

    A real Ctrl-C inside the block still raises ``KeyboardInterrupt``.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    start, t0 = _rss(), time.monotonic()
    deadline = min([t0 + max_seconds, *_DEADLINES])
    outer = deadline < t0 + max_seconds
    _DEADLINES.append(deadline)
    depth = len(_DEADLINES)
    lock, state = threading.Lock(), {"done": False, "why": None, "outer": False}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll):
            rss = _rss()
            grown = 0 if rss is None or start is None else rss - start
            why = None
            if grown > max_bytes:
                why = f"memory grew by {grown / 2**30:.1f} GiB (limit {max_bytes / 2**30:.1f} GiB)"
            elif time.monotonic() > deadline and len(_DEADLINES) == depth:
                # only the innermost block times out: its deadline is never later than an
                # enclosing one's, so it reports the time out (outer=True when the deadline
                # was the enclosing step's) instead of racing the enclosing block's watcher
                why = (f"the time bound of the step it is part of ran out ({deadline - t0:.3g} s after it began)"
                       if outer else f"it ran past {deadline - t0:.3g} s")
                state["outer"] = outer
            if why:
                with lock:
                    if not state["done"]:
                        state["why"] = why
                        _thread.interrupt_main()
                return

    watcher = threading.Thread(target=watch, name="pat-bounded", daemon=True)
    watcher.start()
    try:
        with _address_space(max_bytes + (1 << 30)), _interruptible():  # + room for thread stacks and arenas
            yield
        with lock:
            state["done"] = True
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "can't allocate memory" not in str(e):
            raise
        state["why"] = state["why"] or "it ran out of memory"
        raise OutOfBounds(
            f"{what} stopped: {state['why']}; pat.masks.limits.LIMITS sets the bounds, "
            "or use level='connection'.", outer=state["outer"]
        ) from None
    except KeyboardInterrupt:
        if state["why"] is None:
            raise
        raise OutOfBounds(
            f"{what} stopped: {state['why']}; pat.masks.limits.LIMITS sets the bounds, "
            "or use level='connection'.", outer=state["outer"]
        ) from None
    finally:
        with lock:
            state["done"] = True
        stop.set()
        watcher.join()
        _DEADLINES.pop()
