"""Contract: what the function sees is what was passed at the moment of the call, and
what comes back is what it returned, with pickle's own semantics, on every backend."""

from __future__ import annotations

import functools
import hashlib
import threading
from typing import Any

import numpy as np
import pytest

import ascend
from ascend import _config

TIMEOUT = 120

# -- the functions the tests call ------------------------------------------------------


@ascend.remote
def _fingerprint(value: Any) -> str:
    """What the function saw: the SHA-256 of the value's bytes."""
    import hashlib

    import numpy as np

    if isinstance(value, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
    return hashlib.sha256(bytes(value)).hexdigest()


@ascend.remote
def _echo(*args: Any, **kwargs: Any) -> Any:
    return args, kwargs


@ascend.remote
def _identity(value: Any) -> Any:
    return value


@ascend.remote
def _sharing(a: Any, b: Any, *, c: Any) -> tuple[bool, bool]:
    return a is b, a is c


@ascend.remote
def _add(a: int, b: int = 0) -> int:
    return a + b


def _local_fingerprint(value: Any) -> str:
    return str(_fingerprint.local(value))


def _store() -> tuple[Any, str, str]:
    """The configured store's filesystem, its storage root and blobs folder (fsspec paths;
    any backend's store: a local folder, or the cluster's S3 for pods)."""
    import fsspec

    settings = _config.current()
    fs, root = fsspec.core.url_to_fs(settings.storage, **dict(settings.storage_options))
    _, blobs = fsspec.core.url_to_fs(settings.blobs, **dict(settings.storage_options))
    return fs, root, blobs


def _stored_blobs() -> dict[str, bytes]:
    """Every blob in the configured store, by the name it is stored under."""
    fs, _, blobs = _store()
    folder = f"{blobs}/sha256"
    if not fs.isdir(folder):
        return {}
    return {path.rsplit("/", 1)[1]: fs.cat_file(path) for path in fs.find(folder)}


def _stored_files() -> list[str]:
    fs, root, _ = _store()
    return list(fs.find(root)) if fs.exists(root) else []


# -- 1. a snapshot at the moment of the call -------------------------------------------

LAYOUTS = {
    "64KiB": lambda: np.arange(8192, dtype=np.float64),
    "4MiB": lambda: np.arange(1 << 19, dtype=np.float64),
    "fortran-order": lambda: np.asfortranarray(
        np.arange(64 * 1024, dtype=np.int32).reshape(256, 256)
    ),
    "strided": lambda: np.arange(1 << 18, dtype=np.int64)[::2],
    "over-a-bytearray": lambda: np.frombuffer(bytearray(range(256)) * 4096, dtype=np.uint8),
    "over-a-memoryview": lambda: np.frombuffer(memoryview(bytearray(1 << 16)), dtype=np.uint8),
    "0-d": lambda: np.array(3.5),
    "structured": lambda: np.array([(1, 2.0)] * 5000, dtype=[("a", "i4"), ("b", "f8")]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_array_reused_as_a_buffer_after_the_call_is_seen_as_it_was(
    backend: str, layout: str
) -> None:
    array = LAYOUTS[layout]()
    expected = _local_fingerprint(array)
    fut = _fingerprint(array)
    array[...] = 0
    assert fut.result(timeout=TIMEOUT) == expected


@pytest.mark.parametrize("size", [64 << 10, 4 << 20])
def test_a_bytearray_changed_after_the_call_is_seen_as_it_was(backend: str, size: int) -> None:
    buffer = bytearray(b"\x01" * size)
    fut = _fingerprint(buffer)
    buffer[:] = b"\x00" * size
    assert fut.result(timeout=TIMEOUT) == hashlib.sha256(b"\x01" * size).hexdigest()


def test_a_stdlib_array_changed_after_the_call_is_seen_as_it_was(backend: str) -> None:
    import array

    values = array.array("d", range(1 << 16))
    expected = hashlib.sha256(values.tobytes()).hexdigest()
    fut = _fingerprint(values)
    values[0] = -1.0
    assert fut.result(timeout=TIMEOUT) == expected


def test_a_memoryview_changed_after_the_call_is_seen_as_it_was(backend: str) -> None:
    buffer = bytearray(b"\x07" * (64 << 10))
    fut = _fingerprint(memoryview(buffer))  # cloudpickle sends a memoryview's bytes
    buffer[:] = bytes(len(buffer))
    assert fut.result(timeout=TIMEOUT) == hashlib.sha256(b"\x07" * (64 << 10)).hexdigest()


def test_a_value_nested_too_deeply_to_pickle_names_the_fix(backend: str) -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ascend.SerializationError, match="nests too deeply.*Fix"):
        _identity(deep)


def test_an_array_inside_a_container_is_snapshotted_too(backend: str) -> None:
    array = np.ones(1 << 18)
    fut = _identity({"weights": array, "also": [array]})
    array[...] = 0
    value = fut.result(timeout=TIMEOUT)
    assert value["weights"].sum() == 1 << 18 and value["also"][0] is value["weights"]


@pytest.mark.parametrize(
    "length",
    [1 << 12, 1 << 16, 1 << 19],
    ids=["inputs-in-the-package", "inputs-in-their-own-files", "blobs"],
)
def test_a_map_sees_each_item_as_it_was_at_the_call(backend: str, length: int) -> None:
    arrays = [np.full(length, i, dtype=np.float64) for i in range(3)]
    expected = [_local_fingerprint(a) for a in arrays]
    shared = arrays[0]
    fut = _fingerprint.map([*arrays, shared])
    for a in arrays:
        a[...] = -1
    assert fut.result(timeout=TIMEOUT) == [*expected, expected[0]]


def test_blobs_are_stored_under_their_own_digest_and_later_calls_still_work(
    backend: str,
) -> None:
    array = np.arange(1 << 19, dtype=np.float64)  # 4 MiB: a blob
    original = array.copy()
    fut = _fingerprint(array)
    array[...] = 0
    fut.result(timeout=TIMEOUT)
    blobs = _stored_blobs()
    assert blobs, "a 4 MiB argument is stored as a blob"
    assert all(hashlib.sha256(data).hexdigest() == name for name, data in blobs.items())
    # The original content again: its blob (if reused) must still be the original bytes.
    assert _fingerprint(original).result(timeout=TIMEOUT) == _local_fingerprint(original)


# -- 2. pickle's own semantics, both ways ----------------------------------------------


def test_a_dict_that_contains_itself_goes_and_comes_back_intact(backend: str) -> None:
    cyclic: dict[str, Any] = {"name": "loop"}
    cyclic["self"] = cyclic
    ((args, _),) = [_echo(cyclic).result(timeout=TIMEOUT)]
    assert args[0]["self"] is args[0]
    back = _identity(cyclic).result(timeout=TIMEOUT)
    assert back["self"] is back and back["name"] == "loop"


class _Node:
    def __init__(self, name: str, parent: _Node | None = None) -> None:
        self.name = name
        self.parent = parent
        self.children: list[_Node] = []
        if parent is not None:
            parent.children.append(self)


def test_a_tree_with_parent_links_keeps_its_shape(backend: str) -> None:
    root = _Node("root")
    for i in range(3):
        child = _Node(f"c{i}", root)
        _Node(f"g{i}", child)
    back = _identity(root).result(timeout=TIMEOUT)
    assert [c.name for c in back.children] == ["c0", "c1", "c2"]
    assert all(c.parent is back for c in back.children)
    assert all(g.parent is c for c in back.children for g in c.children)


def test_one_object_passed_in_several_places_is_one_object_in_the_call(backend: str) -> None:
    shared = {"rows": [1, 2, 3]}
    assert _sharing(shared, shared, c=shared).result(timeout=TIMEOUT) == (True, True)
    assert _sharing([shared], shared, c=[1]).result(timeout=TIMEOUT) == (False, False)


@ascend.remote
def _holder_shares(rows: list[Any], holder: dict[str, Any], *, first: Any) -> list[bool]:
    return [holder["rows"] is rows, holder["first"] is rows[0], first is rows[0]]


def test_a_large_argument_shares_its_objects_with_the_other_arguments(backend: str) -> None:
    rows = [{"v": i} for i in range(300_000)]  # pickles to more than the blob threshold
    holder = {"rows": rows, "first": rows[0]}
    fut = _holder_shares(rows, holder, first=rows[0])
    assert fut.result(timeout=TIMEOUT) == [True, True, True]


def test_one_object_returned_in_several_places_is_one_object(backend: str) -> None:
    shared = [1, 2]
    args, kwargs = _echo(shared, {"x": shared}, k=shared).result(timeout=TIMEOUT)
    assert args[0] is args[1]["x"] is kwargs["k"]


def test_large_bytes_inside_a_container_keep_the_containers_identity(backend: str) -> None:
    blob = bytes(2 << 20)
    box: list[Any] = [blob]
    box.append(box)
    back = _identity(box).result(timeout=TIMEOUT)
    assert back[1] is back and back[0] == blob


# -- 3. any callable can be remote -----------------------------------------------------


def _power(base: int, exponent: int) -> int:
    return int(base**exponent)


class _Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: int) -> int:
        return x * self.factor


class _Model:
    def __init__(self, offset: int) -> None:
        self.offset = offset

    @ascend.remote
    def predict(self, x: int) -> int:
        return x + self.offset

    @staticmethod
    @ascend.remote
    def static_outside(x: int) -> int:
        return x * 10

    @ascend.remote
    @staticmethod
    def static_inside(x: int) -> int:
        return x * 100

    @classmethod
    @ascend.remote
    def class_outside(cls, x: int) -> str:
        return f"{cls.__name__}:{x}"

    @ascend.remote
    @classmethod
    def class_inside(cls, x: int) -> str:
        return f"{cls.__name__}:{x}"


def test_a_partial_can_be_remote(backend: str) -> None:
    square = ascend.remote(functools.partial(_power, exponent=2))
    assert square(7).result(timeout=TIMEOUT) == 49


def test_an_object_with_call_can_be_remote(backend: str) -> None:
    triple = ascend.remote(_Scaler(3))
    assert triple(5).result(timeout=TIMEOUT) == 15
    assert triple.map([1, 2]).result(timeout=TIMEOUT) == [3, 6]


def test_a_remote_method_binds_self(backend: str) -> None:
    model = _Model(100)
    assert model.predict(1).result(timeout=TIMEOUT) == 101
    assert model.predict.map([1, 2]).result(timeout=TIMEOUT) == [101, 102]
    assert _Model.predict(model, 5).result(timeout=TIMEOUT) == 105


@pytest.mark.parametrize("name", ["static_outside", "static_inside"])
def test_a_remote_staticmethod_in_either_order(backend: str, name: str) -> None:
    factor = 10 if name == "static_outside" else 100
    assert getattr(_Model, name)(2).result(timeout=TIMEOUT) == 2 * factor
    assert getattr(_Model(0), name)(3).result(timeout=TIMEOUT) == 3 * factor


@pytest.mark.parametrize("name", ["class_outside", "class_inside"])
def test_a_remote_classmethod_in_either_order(backend: str, name: str) -> None:
    assert getattr(_Model, name)(4).result(timeout=TIMEOUT) == "_Model:4"
    assert getattr(_Model(0), name)(5).result(timeout=TIMEOUT) == "_Model:5"


@ascend.remote
async def _async_double(x: int) -> int:
    import asyncio

    await asyncio.sleep(0.01)
    return 2 * x


class _AsyncFailure(Exception):
    pass


@ascend.remote
async def _async_fail() -> None:
    raise _AsyncFailure("from a coroutine")


def test_an_async_function_is_awaited_and_its_value_returned(backend: str) -> None:
    assert _async_double(21).result(timeout=TIMEOUT) == 42
    assert _async_double.map([1, 2]).result(timeout=TIMEOUT) == [2, 4]


def test_an_async_functions_exception_comes_back_as_its_type(backend: str) -> None:
    with pytest.raises(_AsyncFailure, match="from a coroutine") as caught:
        _async_fail().result(timeout=TIMEOUT)
    assert "asyncio" not in str(caught.value.__cause__).split("_async_fail")[0]


# -- 4. arguments are checked against the signature at the call site -------------------


@ascend.remote
def _pair(a: int, b: int) -> int:
    return a + b


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: _add(), "missing a required argument: 'a'"),
        (lambda: _add(1, 2, 3), "too many positional arguments"),
        (lambda: _add(1, c=3), "got an unexpected keyword argument 'c'"),
        (lambda: _pair(1, c=3), "got an unexpected keyword argument 'c'"),
        (lambda: _add(1, a=1), "multiple values for argument 'a'"),
        (lambda: _add.map([1, 2], [3, 4], [5, 6]), r"\(map item 0\): too many positional"),
        (lambda: _add.starmap([(1,), (1, 2), ()]), r"\(map item 2\): missing a required"),
    ],
)
def test_arguments_the_signature_refuses_fail_at_the_call_site(
    backend: str, call: Any, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        call()
    assert _stored_files() == [], "nothing is uploaded for a call that cannot run"


def test_a_bound_method_is_checked_without_self(backend: str) -> None:
    with pytest.raises(TypeError, match="missing a required argument: 'x'"):
        _Model(1).predict()


# -- 5. values come back as they went --------------------------------------------------


@ascend.remote
def _arrays() -> dict[str, Any]:
    import numpy as np

    base = np.arange(1 << 18, dtype=np.float64)
    return {
        "small": np.arange(10.0),
        "large": base,
        "fortran": np.asfortranarray(base.reshape(512, 512)),
        "strided": base[::3],
        "0-d": np.array(1.5),
    }


def test_returned_arrays_are_writable(backend: str) -> None:
    arrays = _arrays().result(timeout=TIMEOUT)
    for name, array in arrays.items():
        assert array.flags.writeable, name
        array[...] = 0


@ascend.remote
def _type_and_value(value: Any) -> tuple[str, Any]:
    return type(value).__name__, value


@pytest.mark.parametrize(
    "value",
    [b"small", bytes(range(256)) * 8192, bytearray(b"\x01" * (2 << 20)), (bytes(2 << 20), 1)],
    ids=["small-bytes", "large-bytes", "large-bytearray", "tuple-with-large-bytes"],
)
def test_bytes_like_values_keep_their_type_both_ways(backend: str, value: Any) -> None:
    seen, back = _type_and_value(value).result(timeout=TIMEOUT)
    assert seen == type(value).__name__ and type(back) is type(value) and back == value


def test_arrays_passed_to_the_function_are_writable_there(backend: str) -> None:
    @ascend.remote
    def writable(a: Any) -> bool:
        a[...] = 1
        return bool(a.flags.writeable)

    assert writable(np.zeros(1 << 19)).result(timeout=TIMEOUT) is True
    assert writable(np.zeros(10)).result(timeout=TIMEOUT) is True


@ascend.remote
def _returns_while_changing() -> Any:
    import threading
    import time

    import numpy as np

    array = np.zeros(1 << 19)

    def keep_changing() -> None:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            array[...] += 1

    threading.Thread(target=keep_changing, daemon=True).start()
    time.sleep(0.05)
    return array


def test_a_returned_array_a_left_thread_keeps_changing_still_passes_its_signature(
    backend: str,
) -> None:
    assert _returns_while_changing().result(timeout=TIMEOUT).shape == (1 << 19,)


# -- 6. what cannot come back says so --------------------------------------------------


@ascend.remote
def _returns_a_lock() -> Any:
    import threading

    return threading.Lock()


@ascend.remote
def _returns_a_generator() -> Any:
    return (i for i in range(3))


def test_an_unpicklable_return_value_is_a_serialization_error(backend: str) -> None:
    with pytest.raises(ascend.SerializationError, match=r"return value .* Fix: return plain"):
        _returns_a_lock().result(timeout=TIMEOUT)
    assert _add(1, 2).result(timeout=TIMEOUT) == 3


@ascend.remote
def _deep(depth: int) -> list[Any]:
    deep: list[Any] = []
    for _ in range(depth):
        deep = [deep]
    return deep


def test_a_return_value_nested_too_deeply_is_a_serialization_error_naming_the_fix(
    backend: str,
) -> None:
    with pytest.raises(ascend.SerializationError, match="Fix: return a flatter structure"):
        _deep(100_000).result(timeout=TIMEOUT)


def test_a_returned_generator_names_the_fix(backend: str) -> None:
    with pytest.raises(ascend.SerializationError, match=r"Fix: return a list"):
        _returns_a_generator().result(timeout=TIMEOUT)


class NeedsTwoArguments(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


class HoldsALock(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


@ascend.remote
def _raise(kind: str) -> None:
    if kind == "args":
        raise NeedsTwoArguments(7, "bad input")
    if kind == "lock":
        raise HoldsALock("locked out")

    class LocalOnly(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(a + b)

    raise LocalOnly(1, 2)


@pytest.mark.parametrize(
    ("kind", "error", "reason"),
    [
        ("args", NeedsTwoArguments, "cannot be rebuilt from its pickle"),
        ("lock", HoldsALock, "it cannot be pickled"),
    ],
)
def test_an_exception_that_cannot_be_rebuilt_is_still_caught_by_its_type(
    backend: str, kind: str, error: type[Exception], reason: str
) -> None:
    with pytest.raises(error) as caught:
        _raise(kind).result(timeout=TIMEOUT)
    assert isinstance(caught.value, ascend.RemoteError)
    assert reason in caught.value.reason
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "could not be rebuilt exactly" in notes and reason in notes


def test_the_attributes_that_travel_are_kept_on_an_exception_not_rebuilt_exactly(
    backend: str,
) -> None:
    with pytest.raises(NeedsTwoArguments) as caught:
        _raise("args").result(timeout=TIMEOUT)
    assert caught.value.code == 7
    with pytest.raises(HoldsALock) as held:
        _raise("lock").result(timeout=TIMEOUT)
    assert not hasattr(held.value, "lock"), "a lock cannot travel"
    assert "attributes left behind: lock (TypeError)" in held.value.reason


def test_an_exception_whose_type_is_unknown_here_is_a_remote_error(backend: str) -> None:
    with pytest.raises(ascend.RemoteError, match="LocalOnly: 3") as caught:
        _raise("local").result(timeout=TIMEOUT)
    assert type(caught.value) is ascend.RemoteError
