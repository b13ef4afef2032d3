"""Import torch-pruning without losing a Ctrl-C.

torch-pruning 1.6 imports timm (slow: seconds) inside ``try: ... except:``, so a SIGINT that
arrives meanwhile is swallowed and the command goes on as if nothing was pressed. pat's
first use of torch-pruning often comes after files are being written (``pat split`` counts
each child's MACs), so the import holds a SIGINT back and raises it once the import is done.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import ModuleType

__all__ = ["torch_pruning"]


def torch_pruning() -> ModuleType:
    if "torch_pruning" in sys.modules or threading.current_thread() is not threading.main_thread():
        import torch_pruning as tp

        return tp
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        import torch_pruning as tp
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt
    return tp
