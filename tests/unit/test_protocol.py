import pickle

import cloudpickle
import numpy as np
import pytest

from ascend_runner import protocol as p

KEY = b"k" * 32


def _join(parts: list) -> bytes:
    return b"".join(bytes(part) for part in parts)


def test_envelope_round_trips_pickle_and_out_of_band_buffers() -> None:
    array = np.arange(1_000_000, dtype=np.float64)
    buffers: list = []
    pickled = cloudpickle.dumps(array, protocol=5, buffer_callback=buffers.append)
    assert len(pickled) < 1000, "the array must travel out of band, not inside the pickle"
    data = _join(p.encode("package", pickled, [b.raw() for b in buffers], key=KEY))
    header, offset = p.read_header(data)
    body, oob = p.split_body(data, header, offset, key=KEY)
    assert header.buffer_lengths == (array.nbytes,)
    np.testing.assert_array_equal(pickle.loads(body, buffers=oob), array)


def test_large_bytes_are_lifted_out_of_band_and_come_back_as_bytes() -> None:
    blob = bytes(range(256)) * (p.LARGE_BYTES // 256 + 1)
    buffers: list = []
    pickled = cloudpickle.dumps(
        p.lift_large_bytes((blob, 1)), protocol=5, buffer_callback=buffers.append
    )
    assert len(pickled) < 1000 and len(buffers) == 1
    value = pickle.loads(pickled, buffers=buffers)
    assert value == (blob, 1) and type(value[0]) is bytes


@pytest.mark.parametrize("position", [20, -1])
def test_flipped_byte_is_refused_by_the_signature(position: int) -> None:
    data = bytearray(_join(p.encode("result", pickle.dumps("hello"), key=KEY)))
    data[position] ^= 0x01
    with pytest.raises(p.EnvelopeError):
        header, offset = p.read_header(data)
        p.split_body(data, header, offset, key=KEY)


def test_unsigned_envelope_is_refused_when_a_key_is_configured() -> None:
    data = _join(p.encode("result", pickle.dumps(1)))
    header, offset = p.read_header(data)
    with pytest.raises(p.SignatureError, match="not signed"):
        p.split_body(data, header, offset, key=KEY)


def test_other_key_is_refused() -> None:
    data = _join(p.encode("result", pickle.dumps(1), key=KEY))
    header, offset = p.read_header(data)
    with pytest.raises(p.SignatureError, match="does not match"):
        p.split_body(data, header, offset, key=b"x" * 32)


def test_truncated_or_foreign_bytes_are_refused() -> None:
    data = _join(p.encode("result", pickle.dumps(list(range(100))), key=KEY))
    header, offset = p.read_header(data)
    with pytest.raises(p.EnvelopeError, match="promises"):
        p.split_body(data[:-3], header, offset, key=KEY)
    with pytest.raises(p.EnvelopeError, match="magic"):
        p.read_header(pickle.dumps("not an envelope"))


def test_version_mismatch_message_names_both_sides_and_the_fix() -> None:
    data = _join(p.encode("package", b"", versions={"python": "3.10", "cloudpickle": "2.2.1"}))
    header, _ = p.read_header(data)
    message = p.version_mismatch(header, {"python": "3.11", "cloudpickle": "3.1.3"})
    assert message is not None
    for fragment in (
        "Python 3.10",
        "cloudpickle 2.2.1",
        "Python 3.11",
        "cloudpickle 3.1.3",
        "Fix:",
    ):
        assert fragment in message
    assert p.version_mismatch(header, {"python": "3.10", "cloudpickle": "2.2.1"}) is None


def test_index_lists_expand_like_kubernetes_ranges() -> None:
    assert list(p.parse_indexes("0-3,7,9-10")) == [0, 1, 2, 3, 7, 9, 10]
    assert list(p.parse_indexes("")) == []


def test_reserved_exit_codes_are_distinct_from_success_and_python_errors() -> None:
    reserved = p.ExitCode.reserved()
    assert 0 not in reserved and 1 not in reserved and 2 not in reserved
    assert all(code >= 80 for code in reserved)
