"""Progress of a map: counts, a callback, and a default bar when interactive."""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Outcome = Literal["done", "failed", "cancelled"]


@dataclass(frozen=True)
class Progress:
    """A snapshot of a map's items, passed to a ``progress=`` callback.

    ``running`` counts items that run at this moment: a runner process (a pod) that
    was given a chunk of several items runs them one after another, so it counts once.
    """

    total: int
    done: int
    failed: int
    running: int
    cancelled: int = 0
    preempted: int = 0
    """Times an item was taken off its node by the cluster and run again."""

    @property
    def pending(self) -> int:
        """Items neither over (done, failed, cancelled) nor running yet."""
        return self.total - self.done - self.failed - self.cancelled - self.running


ProgressCallback = Callable[[Progress], Any]


def _interactive() -> bool:
    if "ipykernel" in sys.modules:
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _tqdm_class() -> Any:
    """A widget bar in Jupyter when ipywidgets is installed, else a text bar.

    Chosen here rather than by ``tqdm.auto``, which warns in the notebook cell
    (``TqdmWarning: IProgress not found``) when ipywidgets is missing.
    """
    if "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets") is not None:
        try:
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm
        except ImportError:
            pass
    from tqdm.std import tqdm

    return tqdm


class _Bar:
    """A tqdm bar; streamed output is printed above it (see :mod:`ascend._console`)."""

    def __init__(self, total: int, name: str) -> None:
        from ascend import _console

        self._console = _console
        self._bar = _tqdm_class()(total=total, desc=name, unit="call", leave=True)
        self._closed = False
        _console.bar_shown(True)

    def __call__(self, p: Progress) -> None:
        if self._closed:
            return
        self._bar.n = p.done + p.failed + p.cancelled
        postfix: dict[str, int] = {"failed": p.failed, "running": p.running, "pending": p.pending}
        if p.cancelled:
            postfix["cancelled"] = p.cancelled
        if p.preempted:
            postfix["preempted"] = p.preempted
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()
        if p.done + p.failed + p.cancelled == p.total:
            self._closed = True
            self._bar.close()
            self._console.bar_shown(False)


class Tracker:
    """Counts item outcomes from any thread and reports each change.

    ``started(items)`` is told when a runner process starts on a chunk of items; the
    chunk counts as one running item until all of its items are over.
    """

    def __init__(self, total: int, callback: ProgressCallback) -> None:
        self._lock = threading.Lock()
        self._total = total
        self._counts: dict[Outcome, int] = {"done": 0, "failed": 0, "cancelled": 0}
        self._running: dict[int, int] = {}  # running chunk (first item) -> items not over
        self._chunk_of: dict[int, int] = {}  # item -> its running chunk
        self._over: set[int] = set()
        self._preempted = 0
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

    def started(self, items: range) -> None:
        """A runner process started on ``items`` (again, after a retry: counted once)."""
        with self._lock:
            left = [i for i in items if i not in self._over]
            if left and items.start not in self._running:
                self._running[items.start] = len(left)
                self._chunk_of.update(dict.fromkeys(left, items.start))
            snapshot = self._snapshot()
        self._callback(snapshot)

    def item_done(self, item: int, outcome: Outcome) -> None:
        """Item ``item`` is over; ``outcome`` says how."""
        with self._lock:
            if item in self._over:
                return
            self._over.add(item)
            self._counts[outcome] += 1
            chunk = self._chunk_of.pop(item, None)
            if chunk is not None:
                self._running[chunk] -= 1
                if not self._running[chunk]:
                    del self._running[chunk]
            snapshot = self._snapshot()
        self._callback(snapshot)

    def preempted(self, items: range) -> None:
        """The runner of ``items`` was disrupted; they run again (pending until then)."""
        with self._lock:
            self._preempted += 1
            self._running.pop(items.start, None)
            for item in items:
                self._chunk_of.pop(item, None)
            snapshot = self._snapshot()
        self._callback(snapshot)

    def _snapshot(self) -> Progress:
        c = self._counts
        return Progress(
            self._total,
            c["done"],
            c["failed"],
            len(self._running),
            c["cancelled"],
            self._preempted,
        )
