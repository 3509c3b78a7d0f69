"""How arguments are shipped: large ones become blobs, shared ones are referenced once."""

from __future__ import annotations

import os

from ascend import _serialization
from ascend_runner import protocol as p

KEY = b"k" * 32


def _envelope(value: object, blobs: _serialization.Blobs) -> p.Header:
    data = b"".join(bytes(x) for x in _serialization.encode("input", value, "test", KEY, blobs))
    return p.read_header(data)[0]


def test_bytes_shared_by_many_items_are_one_buffer_and_one_blob() -> None:
    shared = os.urandom(2 * p.LARGE_BYTES)
    blobs = _serialization.Blobs(threshold=p.LARGE_BYTES)
    items = [blobs.arguments((i, shared), {}, "test") for i in range(50)]
    header = _envelope(items, blobs)
    assert len(header.buffer_lengths) == 1 and header.inline_length < 4096
    assert list(blobs.content) == list(filter(None, header.blobs))


def test_a_large_python_value_shared_by_many_items_is_pickled_once() -> None:
    rows = [{"v": i} for i in range(100_000)]
    blobs = _serialization.Blobs(threshold=1 << 16)
    items = [blobs.arguments((rows,), {"scale": i}, "test") for i in range(20)]
    assert all(args[0] is items[0][0][0] for args, _ in items), "one stand-in for one object"
    header = _envelope(items, blobs)
    assert len(header.buffer_lengths) == 1 and len(blobs.content) == 1


def test_small_arguments_stay_as_they_are() -> None:
    blobs = _serialization.Blobs()
    value = {"lr": 3e-4}
    assert blobs.arguments((1, "a", value), {"b": b"xy"}, "test") == ((1, "a", value), {"b": b"xy"})
    assert not blobs.content
