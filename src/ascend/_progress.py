"""Progress of a map: counts, a callback, and a default bar when interactive."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Progress:
    """A snapshot of a map's items, passed to a ``progress=`` callback."""

    total: int
    done: int
    failed: int
    running: int

    @property
    def pending(self) -> int:
        """Items neither finished nor running yet."""
        return self.total - self.done - self.failed - self.running


ProgressCallback = Callable[[Progress], Any]


def _interactive() -> bool:
    if "ipykernel" in sys.modules:
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class _Bar:
    """tqdm.auto: a widget in Jupyter, a bar in a terminal."""

    def __init__(self, total: int, name: str) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=name, unit="call", leave=True)

    def __call__(self, p: Progress) -> None:
        self._bar.n = p.done + p.failed
        self._bar.set_postfix(failed=p.failed, running=p.running, pending=p.pending, refresh=False)
        self._bar.refresh()
        if p.done + p.failed == p.total:
            self._bar.close()


class Tracker:
    """Counts item outcomes from any thread and reports each change."""

    def __init__(self, total: int, callback: ProgressCallback) -> None:
        self._lock = threading.Lock()
        self._total = total
        self._done = self._failed = self._running = 0
        self._callback = callback

    @classmethod
    def create(
        cls, total: int, name: str, progress: bool | ProgressCallback | None
    ) -> Tracker | None:
        """A tracker for ``progress`` (True / False / None = when interactive / callback)."""
        if callable(progress):
            return cls(total, progress)
        if progress is None:
            progress = _interactive()
        if not progress or total == 0:
            return None
        return cls(total, _Bar(total, name))

    def started(self, n: int) -> None:
        with self._lock:
            self._running += n
            snapshot = self._snapshot()
        self._callback(snapshot)

    def item_done(self, *, failed: bool, was_running: bool) -> None:
        with self._lock:
            if failed:
                self._failed += 1
            else:
                self._done += 1
            if was_running:
                self._running = max(self._running - 1, 0)
            snapshot = self._snapshot()
        self._callback(snapshot)

    def _snapshot(self) -> Progress:
        return Progress(self._total, self._done, self._failed, self._running)
