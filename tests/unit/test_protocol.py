import hashlib
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
    parts = p.encode("package", pickled, [b.raw() for b in buffers], key=KEY)
    data = _join(parts)
    header, offset = p.read_header(data)
    body, oob = p.split_body(data, header, offset, key=KEY)
    assert header.buffer_lengths == (array.nbytes,)
    assert p.body_length(parts) == header.inline_length == len(pickled) + array.nbytes
    np.testing.assert_array_equal(pickle.loads(body, buffers=oob), array)


def test_large_bytes_are_lifted_out_of_band_and_come_back_as_bytes() -> None:
    blob = bytes(range(256)) * (p.LARGE_BYTES // 256 + 1)
    buffers: list = []
    pickled = cloudpickle.dumps(
        p.lift_large_bytes(blob), protocol=5, buffer_callback=buffers.append
    )
    assert len(pickled) < 1000 and len(buffers) == 1
    value = pickle.loads(pickled, buffers=buffers)
    assert value == blob and type(value) is bytes


def test_containers_are_never_rebuilt_to_lift_bytes() -> None:
    blob = bytes(p.LARGE_BYTES)
    cyclic: dict[str, object] = {"blob": blob}
    cyclic["self"] = cyclic
    assert p.lift_large_bytes(cyclic) is cyclic
    pair = (blob, 1)
    assert p.lift_large_bytes(pair) is pair


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


def _blob_envelope() -> tuple[bytes, dict[str, bytes], np.ndarray]:

    array = np.arange(100_000, dtype=np.float64)
    buffers: list = []
    pickled = cloudpickle.dumps((array, b"small"), protocol=5, buffer_callback=buffers.append)
    raw = buffers[0].raw()
    digest = hashlib.sha256(raw).hexdigest()
    data = _join(p.encode("input", pickled, [raw], key=KEY, blobs=[digest]))
    assert len(data) < 1000, "a blob is left out of the envelope"
    return data, {digest: bytes(raw)}, array


def test_blobs_are_fetched_by_digest_and_verified() -> None:
    data, store, array = _blob_envelope()
    header, offset = p.read_header(data)
    body, oob = p.split_body(data, header, offset, key=KEY, fetch_blob=store.__getitem__)
    restored, small = pickle.loads(body, buffers=oob)
    np.testing.assert_array_equal(restored, array)
    assert small == b"small"


def test_a_blob_used_by_many_buffers_is_fetched_once() -> None:
    raw = bytes(range(256)) * 64
    digest = hashlib.sha256(raw).hexdigest()
    parts = p.encode("input", b"pickle", [raw] * 5, key=KEY, blobs=[digest] * 5)
    data = _join(parts)
    fetched: list[str] = []

    def fetch(d: str) -> bytes:
        fetched.append(d)
        return raw

    header, offset = p.read_header(data)
    _, oob = p.split_body(data, header, offset, key=KEY, fetch_blob=fetch)
    assert fetched == [digest] and [bytes(b) for b in oob] == [raw] * 5


def test_a_blob_that_does_not_match_its_digest_is_refused() -> None:
    data, store, _ = _blob_envelope()
    header, offset = p.read_header(data)
    (digest,) = store
    with pytest.raises(p.EnvelopeError, match="does not match its digest"):
        p.split_body(data, header, offset, key=KEY, fetch_blob=lambda d: b"\0" * len(store[d]))
    with pytest.raises(p.EnvelopeError, match="no blob store"):
        p.split_body(data, header, offset, key=KEY)
    assert header.blobs == (digest,)


def test_the_signature_covers_the_blob_digests() -> None:
    data, store, _ = _blob_envelope()
    (digest,) = store
    forged = data.replace(digest.encode(), ("0" * 64).encode())
    header, offset = p.read_header(forged)
    with pytest.raises(p.SignatureError):
        p.split_body(forged, header, offset, key=KEY, fetch_blob=lambda d: b"")


def test_a_malformed_blob_digest_is_refused() -> None:
    data, store, _ = _blob_envelope()
    (digest,) = store
    with pytest.raises(p.EnvelopeError, match="not a SHA-256"):
        p.read_header(data.replace(digest.encode(), b"../../etc/passwd".ljust(64, b"x")))
