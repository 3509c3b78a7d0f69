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


def test_an_argument_changed_after_encoding_changes_neither_envelope_nor_blob() -> None:
    import numpy as np

    small, large = np.arange(8192.0), np.arange(float(1 << 19))
    blobs = _serialization.Blobs()
    parts = _serialization.encode("package", (small, large), "test", KEY, blobs)
    before = b"".join(bytes(x) for x in parts)
    small[...] = 0
    large[...] = 0
    data = b"".join(bytes(x) for x in parts)
    assert data == before
    header, offset = p.read_header(data)
    content = {d: bytes(v) for d, v in blobs.content.items()}
    _, buffers = p.split_body(data, header, offset, key=KEY, fetch_blob=content.__getitem__)
    assert np.frombuffer(buffers[1], dtype=np.float64).sum() == sum(range(1 << 19))


def test_an_array_shared_by_many_items_is_copied_and_hashed_once() -> None:
    import numpy as np

    shared = np.arange(float(1 << 19))
    blobs = _serialization.Blobs()
    for i in range(5):
        _serialization.encode("input", [(shared, i)], "test", KEY, blobs)
    assert len(blobs.content) == 1 and len(blobs._snapshots) == 1


def test_a_bytes_buffer_is_not_copied_for_its_snapshot() -> None:
    data = os.urandom(100)
    view = _serialization.snapshot(memoryview(data))
    assert view.obj is data


def test_decoded_arrays_are_writable_even_from_read_only_bytes() -> None:
    import numpy as np

    parts = _serialization.encode("result", ("ok", np.arange(10.0)), "test", KEY)
    data = b"".join(bytes(x) for x in parts)  # what object stores hand back: bytes
    status, array = _serialization.decode(data, "test", KEY)
    assert status == "ok" and array.flags.writeable


def test_a_self_containing_value_pickles_as_plain_pickle_does() -> None:
    cyclic: dict[str, object] = {}
    cyclic["self"] = cyclic
    parts = _serialization.encode("result", ("ok", cyclic), "test", KEY)
    _, back = _serialization.decode(b"".join(bytes(x) for x in parts), "test", KEY)
    assert back["self"] is back


class _Unrebuildable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(a + b)


def _info(type_name: str, reason: str) -> dict[str, object]:
    return {
        "type": type_name,
        "message": "3",
        "traceback": "Traceback...",
        "exception": None,
        "rebuild_error": reason,
    }


def test_an_importable_exception_type_is_rebuilt_as_a_remote_error_subclass() -> None:
    from ascend import RemoteError

    name = f"{__name__}._Unrebuildable"
    error = _serialization.rebuild_exception(_info(name, "it cannot be pickled: X"), "here")
    assert isinstance(error, _Unrebuildable) and isinstance(error, RemoteError)
    assert str(error) == "3" and error.reason == "it cannot be pickled: X"
    assert type(error).__qualname__ == "_Unrebuildable", "tracebacks name the original type"
    again = _serialization.rebuild_exception(_info(name, "r"), "here")
    assert type(again) is type(error), "one class per type"
    import pickle

    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, _Unrebuildable) and copy.message == "3"


def test_exception_types_are_only_looked_up_in_imported_modules() -> None:
    from ascend import RemoteError

    error = _serialization.rebuild_exception(_info("not_imported_mod.Error", "r"), "here")
    assert type(error) is RemoteError


def test_a_base_exception_that_is_not_an_exception_is_never_rebuilt_as_its_type() -> None:
    from ascend import RemoteError

    error = _serialization.rebuild_exception(_info("builtins.SystemExit", "r"), "here")
    assert type(error) is RemoteError


def test_an_os_error_subclass_combines_with_remote_error() -> None:
    error = _serialization.rebuild_exception(_info("builtins.FileNotFoundError", "r"), "h")
    assert isinstance(error, FileNotFoundError) and str(error) == "3"


def test_a_large_argument_sharing_objects_with_another_travels_in_the_call() -> None:
    rows = [{"v": i} for i in range(20_000)]
    blobs = _serialization.Blobs(threshold=1 << 12)
    args, kwargs = blobs.arguments((rows,), {"first": rows[0]}, "test")
    assert args[0] is rows and kwargs["first"] is rows[0], "no stand-in: one pickle keeps both"
    alone, _ = blobs.arguments((rows, 3), {}, "test")
    assert alone[0] is not rows, "alone, the same list is a blob"


def test_two_large_arguments_are_blobs_unless_they_share_an_object() -> None:
    first = [{"v": i} for i in range(20_000)]
    second = [{"w": i} for i in range(20_000)]
    blobs = _serialization.Blobs(threshold=1 << 12)
    apart, _ = blobs.arguments((first, second), {}, "test")
    assert apart[0] is not first and apart[1] is not second, "disjoint: two blobs"
    second.append(first[5])
    together, _ = _serialization.Blobs(threshold=1 << 12).arguments((first, second), {}, "test")
    assert together == (first, second) and together[0] is first, "shared: one pickle"


def test_the_same_object_passed_twice_is_one_blob() -> None:
    rows = [{"v": i} for i in range(20_000)]
    blobs = _serialization.Blobs(threshold=1 << 12)
    args, kwargs = blobs.arguments((rows, [1]), {"again": rows}, "test")
    assert args[0] is kwargs["again"] and args[0] is not rows
