"""A progress bar for the command line (stderr), fed by a step callback."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["ProgressBar"]


class ProgressBar:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, label: str, enabled: bool = True, unit: str = "step") -> None:
        self.label, self.enabled, self.unit = label, enabled, unit
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, i: int, n: int, _latents: Any = None) -> None:
        if not self.enabled:
            return
        done = i + 1
        rate = (time.perf_counter() - self.t0) / done
        bar = "#" * int(30 * done / n)
        speed = f"{rate:.2f} s/{self.unit}" if rate >= 1 else \
            f"{rate * 1000:.0f} ms/{self.unit}"
        line = f"{self.label} [{bar:<30}] {done}/{n} {speed}"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if done == n else ""))
        elif done == n or done == 1:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
