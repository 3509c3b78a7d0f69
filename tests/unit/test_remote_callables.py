"""What ``@ascend.remote`` accepts, refuses and checks before anything is submitted."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator

import pytest

import ascend


def _gen() -> Iterator[int]:
    yield 1


async def _agen() -> AsyncIterator[int]:
    yield 1


class _GeneratorCall:
    def __call__(self) -> Iterator[int]:
        yield 1


@pytest.mark.parametrize("fn", [_gen, _agen, functools.partial(_gen), _GeneratorCall()], ids=str)
def test_a_generator_function_is_refused_when_decorated_with_the_fix(fn: object) -> None:
    with pytest.raises(TypeError, match=r"generator function.*Fix: return a list"):
        ascend.remote(fn)  # type: ignore[call-overload]


def test_options_keep_how_a_method_binds() -> None:
    class Holder:
        @ascend.remote
        @staticmethod
        def f(x: int) -> int:
            return x

    assert Holder.f.options(cpu=1).__get__(Holder(), Holder)._binds == "static"


def test_a_callable_objects_attributes_do_not_shadow_the_remote_functions() -> None:
    class Callable:
        map = "not the remote map"

        def __init__(self) -> None:
            self.local = "not the remote local"

        def __call__(self, x: int) -> int:
            return x

    fn = ascend.remote(Callable())
    assert callable(fn.map) and fn.local(4) == 4


def test_names_of_partials_and_objects_are_readable() -> None:
    def base(a: int, b: int) -> int:
        return a + b

    assert "base" in repr(ascend.remote(functools.partial(base, b=1)))
    assert "_GeneratorCall" not in repr(ascend.remote(lambda: 1))


def _triple(x: int) -> int:
    return 3 * x


def test_a_remote_function_pickles_as_itself_with_its_options() -> None:
    import pickle

    fn = ascend.remote(cpu=2, env={"A": "1"})(_triple)
    back = pickle.loads(pickle.dumps(fn))
    assert isinstance(back, ascend.RemoteFunction) and back.resources == fn.resources
    assert back.local(2) == 6


def test_without_ascend_a_pickled_remote_function_is_a_stand_in_that_names_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pickle
    import sys

    from ascend_runner import protocol

    fn = ascend.remote(_triple)
    data = pickle.dumps(fn)
    monkeypatch.setitem(sys.modules, "ascend._remote", None)  # import fails, as in a pod
    stand_in = pickle.loads(data)
    assert type(stand_in) is protocol._RemoteFunctionUnavailable
    with pytest.raises(RuntimeError, match=r"ascend-k8s is not installed.*Fix: add"):
        stand_in(1)
    again = pickle.dumps(stand_in)
    monkeypatch.undo()
    assert isinstance(pickle.loads(again), ascend.RemoteFunction), "back on the client"


def test_a_remote_partial_or_object_in_a_class_body_does_not_bind_like_python() -> None:
    def add(a: int, b: int) -> int:
        return a + b

    class Holder:
        plus_one = ascend.remote(functools.partial(add, 1))
        method = ascend.remote(add)

    holder = Holder()
    assert holder.plus_one is Holder.plus_one, "a partial is not a descriptor"
    assert holder.method.__wrapped__.__self__ is holder, "a function binds its instance"


def _plus_one(a: int) -> int:
    return a + 1


@pytest.mark.parametrize(
    "make",
    [
        lambda f: f,
        lambda f: f.options(timeout=5),
        lambda f: functools.partial(f, 1),
    ],
    ids=["remote", "options", "partial"],
)
def test_a_remote_function_made_remote_again_is_refused_when_decorated(make: object) -> None:
    already = make(ascend.remote(_plus_one))  # type: ignore[operator]
    with pytest.raises(TypeError, match=r"already remote.*Fix: apply @ascend.remote once"):
        ascend.remote(already)
    with pytest.raises(TypeError, match=r"already remote"):
        ascend.remote(cpu=1)(already)
