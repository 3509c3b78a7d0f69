"""Cutting a runner's output into lines, and each line to the map item that printed it.

One implementation for every reader of a runner's output: the local backend's pipe, a
pod's log stream, the copy the runner stores. Lines end at ``\\n`` only: a ``\\r``
(progress bars, CRLF) stays part of its line, a line has no length limit, and bytes that
are not UTF-8 are replaced (U+FFFD) rather than dropped or fatal.

In a chunk of several map items the runner writes :data:`ITEM_MARKER`, the item's index
and ``\\n`` before running each item. The marker is found anywhere, even right after an
item's last line that had no newline: that line then ends at the marker, so it is never
glued to the next item's output.
"""

from __future__ import annotations

from typing import Final

ITEM_MARKER: Final = b"\x00ascend-runner: item "
"""Announces the map item whose output follows (a NUL first: no text line starts so)."""


def item_marker(item: int) -> bytes:
    """The bytes the runner writes before running ``item``."""
    return ITEM_MARKER + str(item).encode() + b"\n"


def _decode(block: bytes) -> list[str]:
    """The lines of ``block``; a last line without ``\\n`` counts as a line."""
    if not block:
        return []
    lines = block.decode("utf-8", "replace").split("\n")
    if not lines[-1]:
        lines.pop()
    return lines


class LineFramer:
    """Turns output bytes, fed in pieces of any size, into whole lines per item.

    ``feed`` and ``end`` return ``(item, lines)`` batches in output order; a line is a
    ``str`` without its ``\\n``. Bytes after the last ``\\n`` wait for the next ``feed``,
    or for ``end``, which delivers them as the last line.

    Example::

        framer = LineFramer(first_item=0)
        framer.feed(b"a\\nb")  # [(0, ["a"])]
        framer.end()            # [(0, ["b"])]
    """

    __slots__ = ("_partial", "item")

    def __init__(self, first_item: int = 0) -> None:
        self.item = first_item
        self._partial: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[int, list[str]]]:
        cut = data.rfind(b"\n")
        if cut < 0:
            if data:
                self._partial.append(data)
            return []
        if self._partial:
            self._partial.append(data[: cut + 1])
            block = b"".join(self._partial)
            self._partial = []
        else:
            block = data[: cut + 1] if cut + 1 < len(data) else data
        if cut + 1 < len(data):
            self._partial.append(data[cut + 1 :])
        return self._lines(block)

    def end(self) -> list[tuple[int, list[str]]]:
        """Everything not yet delivered: the output is over."""
        if not self._partial:
            return []
        block, self._partial = b"".join(self._partial), []
        return self._lines(block + b"\n")

    def _lines(self, block: bytes) -> list[tuple[int, list[str]]]:
        """Lines of ``block``, which ends with ``\\n`` (so every marker in it is whole)."""
        if ITEM_MARKER not in block:
            return [(self.item, _decode(block))]
        batches: list[tuple[int, list[str]]] = []
        start = search = 0
        while (found := block.find(ITEM_MARKER, search)) >= 0:
            digits_at = found + len(ITEM_MARKER)
            newline = block.index(b"\n", digits_at)
            digits = block[digits_at:newline]
            if not digits.isdigit():  # not a marker after all: ordinary output
                search = digits_at
                continue
            before = _decode(block[start:found])
            if before:
                batches.append((self.item, before))
            self.item = int(digits)
            start = search = newline + 1
        rest = _decode(block[start:])
        if rest:
            batches.append((self.item, rest))
        return batches


def lines_by_item(data: bytes, first_item: int) -> dict[int, list[str]]:
    """A whole output (a stored copy) as lines per item."""
    framer = LineFramer(first_item)
    out: dict[int, list[str]] = {}
    for item, lines in [*framer.feed(data), *framer.end()]:
        out.setdefault(item, []).extend(lines)
    return out
