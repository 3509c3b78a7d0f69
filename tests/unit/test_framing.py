"""Cutting a runner's output into lines per map item (ascend_runner.framing)."""

from __future__ import annotations

import pytest

from ascend_runner.framing import LineFramer, item_marker, lines_by_item


def _all(framer: LineFramer, pieces: list[bytes]) -> list[tuple[int, list[str]]]:
    batches = [b for piece in pieces for b in framer.feed(piece)] + framer.end()
    merged: list[tuple[int, list[str]]] = []
    for item, lines in batches:
        if merged and merged[-1][0] == item:
            merged[-1][1].extend(lines)
        else:
            merged.append((item, list(lines)))
    return merged


def _split_everywhere(data: bytes) -> list[list[bytes]]:
    """The same bytes fed whole, one byte at a time, and cut at every third byte."""
    return [[data], [data[i : i + 1] for i in range(len(data))], [data[:3], data[3:]]]


@pytest.mark.parametrize("cut", range(3))
def test_lines_are_the_same_however_the_bytes_arrive(cut: int) -> None:
    data = b"one\ntwo\r\nthree\n"
    assert _all(LineFramer(), _split_everywhere(data)[cut]) == [(0, ["one", "two\r", "three"])]


def test_a_carriage_return_inside_a_line_does_not_end_it() -> None:
    assert _all(LineFramer(), [b"10%\r50%\r100%\ndone\n"]) == [(0, ["10%\r50%\r100%", "done"])]


def test_output_without_a_final_newline_is_its_last_line() -> None:
    framer = LineFramer()
    assert framer.feed(b"a\nb") == [(0, ["a"])]
    assert framer.end() == [(0, ["b"])]


def test_a_line_of_several_megabytes_arrives_whole() -> None:
    line = b"y" * (5 << 20)
    pieces = [line[i : i + 65536] for i in range(0, len(line), 65536)] + [b"\nnext\n"]
    assert _all(LineFramer(), pieces) == [(0, [line.decode(), "next"])]


def test_bytes_that_are_not_utf8_are_replaced_not_dropped() -> None:
    assert _all(LineFramer(), [b"ok \xff\xfe end\nnext\n"]) == [
        (0, ["ok \ufffd\ufffd end", "next"])
    ]


def test_a_character_split_between_reads_is_decoded_whole() -> None:
    data = "héllo\n".encode()
    assert _all(LineFramer(), [data[:2], data[2:]]) == [(0, ["héllo"])]


def test_empty_lines_are_kept() -> None:
    assert _all(LineFramer(), [b"\n\na\n\n"]) == [(0, ["", "", "a", ""])]


@pytest.mark.parametrize("cut", range(3))
def test_item_markers_switch_the_item_and_are_not_output(cut: int) -> None:
    data = b"a\n" + item_marker(4) + b"b\n" + item_marker(5) + b"c\n"
    pieces = _split_everywhere(data)[cut]
    assert _all(LineFramer(3), pieces) == [(3, ["a"]), (4, ["b"]), (5, ["c"])]


def test_a_line_without_newline_ends_at_the_next_items_marker() -> None:
    data = b"no newline" + item_marker(1) + b"next\n"
    assert _all(LineFramer(0), [data]) == [(0, ["no newline"]), (1, ["next"])]


def test_an_item_that_prints_nothing_gets_no_lines() -> None:
    data = item_marker(0) + item_marker(1) + b"x\n"
    assert _all(LineFramer(0), [data]) == [(1, ["x"])]


def test_text_that_resembles_a_marker_without_a_number_is_output() -> None:
    data = b"\x00ascend-runner: item xyz\n"
    assert _all(LineFramer(0), [data]) == [(0, ["\x00ascend-runner: item xyz"])]


def test_a_stored_copy_is_split_by_item() -> None:
    data = b"first\n" + item_marker(8) + b"binary \xff" + item_marker(9) + b"last"
    assert lines_by_item(data, 7) == {7: ["first"], 8: ["binary \ufffd"], 9: ["last"]}
